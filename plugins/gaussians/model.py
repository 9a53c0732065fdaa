"""The modules the methods quantize and return.

``GaussianModel``: a float scene as parameters. ``QuantizedGaussians``: a compressed scene: positions at fp16 (in
the canonical order), and each attribute as codes with what decodes them: a product VQ's codebooks
(``VQAttribute``: svq, vq, omg), per-channel 8-bit grids (``UniformAttribute``: uniform8), or the OMG attribute
MLPs on decoded features (``omg.OMGDecoder``). Both render camera rows: ``forward(cameras (B, 22) or (22,)) ->
images (B, 3, H, W)`` (``render.Camera.to_tensor``), decoding the attributes on every call (the codes are what
stays resident).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polyquant.api import describe_model
from polyquant.primitives import dequantize
from polyquant.vq import ProductVQ

from .coding import fixed_bits
from .render import Camera, render
from .scene import GaussianScene, rest_bands

__all__ = ["GaussianModel", "QuantizedGaussians", "VQAttribute", "UniformAttribute", "attribute_matrix",
           "scene_from_attributes", "render_rows", "code_dtype", "BACKGROUND"]

BACKGROUND = (0.0, 0.0, 0.0)
_FLAT = ("scale", "rotation", "opacity", "sh_dc")


def attribute_matrix(scene: GaussianScene, name: str) -> Tensor:
    """The (N, D) matrix of one attribute as the methods quantize it: scale (log), rotation (raw quaternion),
    opacity (logit), sh_dc, and sh_rest flattened band-major ((N, B * 3): a slice of 3 is one band's RGB)."""
    if name in _FLAT:
        return getattr(scene, name)
    if name == "sh_rest":
        return scene.sh_rest.reshape(scene.num_gaussians, -1)
    raise KeyError(f"no attribute {name!r}")


def scene_from_attributes(xyz: Tensor, attrs: dict[str, Tensor], sh_degree: int) -> GaussianScene:
    """A scene from (N, D) attribute matrices (``attribute_matrix``'s layout); a degree-0 scene needs no sh_rest."""
    n = xyz.shape[0]
    rest = attrs.get("sh_rest", xyz.new_zeros(n, 0)).reshape(n, rest_bands(sh_degree), 3)
    return GaussianScene(xyz, attrs["scale"], attrs["rotation"], attrs["opacity"], attrs["sh_dc"], rest)


def render_rows(scene: GaussianScene, cameras: Tensor, background: Tensor) -> Tensor:
    """Images (B, 3, H, W) of camera rows (B, 22) or (3, H, W) of one row (22,)."""
    if cameras.dim() == 1:
        return render(scene, Camera.from_tensor(cameras), background)
    if cameras.dim() != 2:
        raise ValueError(f"cameras must be (22,) or (B, 22) rows, got shape {tuple(cameras.shape)}")
    return torch.stack([render(scene, Camera.from_tensor(row), background) for row in cameras])


def code_dtype(k: int) -> torch.dtype:
    """The smallest signed integer type that holds codes of [0, k)."""
    return torch.int16 if k <= 2**15 else torch.int32


class GaussianModel(nn.Module):
    """A float scene whose attributes are parameters (differentiable renders)."""

    def __init__(self, scene: GaussianScene) -> None:
        super().__init__()
        for name, t in scene.tensors().items():
            setattr(self, name, nn.Parameter(t.detach().clone().float()))
        self.register_buffer("background", torch.tensor(BACKGROUND), persistent=False)

    def scene(self) -> GaussianScene:
        return GaussianScene(self.xyz, self.scale, self.rotation, self.opacity, self.sh_dc, self.sh_rest)

    @property
    def num_gaussians(self) -> int:
        return int(self.xyz.shape[0])

    @property
    def sh_degree(self) -> int:
        return self.scene().sh_degree

    def forward(self, cameras: Tensor) -> Tensor:
        return render_rows(self.scene(), cameras, self.background)


def skeleton(num_gaussians: int, sh_degree: int) -> GaussianModel:
    """An empty float scene of the layout, described for ``polyquant.save`` (what a restore fills)."""
    model = GaussianModel(GaussianScene.empty(num_gaussians, sh_degree))
    return describe_model(model, {"num_gaussians": int(num_gaussians), "sh_degree": int(sh_degree)})


class VQAttribute(nn.Module):
    """Product-VQ codes (N, M) of one attribute and the quantizer (core ``ProductVQ``) whose codebooks decode them."""

    def __init__(self, quantizer: ProductVQ, codes: Tensor) -> None:
        super().__init__()
        if codes.dim() != 2 or codes.shape[1] != quantizer.num_subvectors:
            raise ValueError(f"codes must be (N, {quantizer.num_subvectors}), got {tuple(codes.shape)}")
        self.quantizer = quantizer
        self.register_buffer("codes", codes.to(code_dtype(max(quantizer.codebook_sizes))))

    def codebooks(self) -> list[Tensor]:
        return [vq.embed for vq in self.quantizer.quantizers]

    def decode(self) -> Tensor:
        return self.quantizer.decode(self.codes.long())

    def index_bits(self) -> int:
        """Bits per Gaussian of the fixed-length codes: sum of ceil(log2 K_m)."""
        return sum(fixed_bits(k) for k in self.quantizer.codebook_sizes)


class UniformAttribute(nn.Module):
    """Per-channel asymmetric integer codes (N, D) of one attribute with their scale and zero point (1, D) each (the
    core's ``choose_qparams`` / ``dequantize`` with one block per column)."""

    def __init__(self, codes: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> None:
        super().__init__()
        if codes.dim() != 2 or scale.shape != (1, codes.shape[1]) or zero_point.shape != scale.shape:
            raise ValueError(f"codes (N, D) with scale and zero point (1, D), got {tuple(codes.shape)}, "
                             f"{tuple(scale.shape)}, {tuple(zero_point.shape)}")
        self.bits = int(bits)
        self.register_buffer("codes", codes.to(torch.uint8))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point.float())

    def decode(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, (self.codes.shape[0], 1))

    def index_bits(self) -> int:
        return self.bits * int(self.codes.shape[1])


class QuantizedGaussians(nn.Module):
    """A compressed scene: fp16 positions (N, 3) in canonical order, ``attributes`` (name -> a module with
    ``decode() -> (N, D)``), and for OMG a ``decoder`` mapping (positions, decoded appearance) to opacity and SH."""

    def __init__(self, xyz: Tensor, attributes: dict[str, nn.Module], sh_degree: int,
                 decoder: nn.Module | None = None) -> None:
        super().__init__()
        self.register_buffer("xyz", xyz.half().float())
        self.attributes = nn.ModuleDict(attributes)
        self.decoder = decoder
        self.sh_degree = int(sh_degree)
        self.register_buffer("background", torch.tensor(BACKGROUND), persistent=False)

    @property
    def num_gaussians(self) -> int:
        return int(self.xyz.shape[0])

    def decoded(self) -> dict[str, Tensor]:
        """Every attribute matrix, decoded (OMG: opacity and SH from the decoder)."""
        attrs = {name: module.decode() for name, module in self.attributes.items()}
        if self.decoder is not None:
            attrs.update(self.decoder(self.xyz, attrs.pop("appearance")))
        return attrs

    def scene(self) -> GaussianScene:
        return scene_from_attributes(self.xyz, self.decoded(), self.sh_degree)

    def index_bits(self) -> int:
        """Bits per Gaussian of the attributes' fixed-length codes (before entropy coding)."""
        return sum(int(m.index_bits()) for m in self.attributes.values())

    def forward(self, cameras: Tensor) -> Tensor:
        return render_rows(self.scene(), cameras, self.background)
