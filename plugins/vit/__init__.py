"""The vit plugin: post-training quantization of vision transformers (``polyquant quantize vit/<method>``).

Methods (each configured by its own ``QuantConfig``, run by ``polyquant.quantize``):

- ``adalog`` (``adalog.AdaLogConfig``): AdaLog, adaptive-base log quantizers after softmax / GELU, FPCS search,
  LayerNorm reparameterization, optional block reconstruction; timm ViT / DeiT / Swin.
- ``qhyvit`` (``qhyvit.QHyViTConfig``): Q-HyViT for hybrid ViTs (MobileViT, EfficientFormer): per-operand
  granularity and scheme search, Hessian-guided metric, bridge-block calibration.
- baselines (``baselines``): ``minmax``, ``percentile``, ``log2``, ``logsqrt2``, ``twin_uniform``; on hybrids
  (``qhyvit``): ``hybrid_minmax``, ``hybrid_percentile`` (Q-HyViT's placement, a plain observer).

Handlers, artifacts and command-line hooks are in ``methods``; shipped digits models in ``models`` / ``hybrid``.
"""
