"""Vision-transformer plugin: AdaLog (ECCV'24) post-training quantization, baselines and the digits task.

Importing this package is light (no torch, no timm). The plugin's entry point is ``polyquant.plugins.vit.spec:SPEC``;
the methods live in ``polyquant.plugins.vit.methods`` (``METHODS``), the quantizers in ``adalog`` and
``quantizers``, the shared harness (wrapping, calibration, FPCS) in ``harness`` and ``fpcs``, the task in ``data``
and ``models``.
"""
