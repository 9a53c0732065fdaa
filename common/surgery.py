"""Model surgery: replace submodules, fold BatchNorm into convolutions, quantize the products inside modules.

| function                                   | what it does                                                        |
|--------------------------------------------|---------------------------------------------------------------------|
| ``set_submodule(model, name, module)``     | replace the submodule at a dotted name (``"blocks.0.attn.qkv"``)    |
| ``replace_modules(model, cls, make)``      | replace every submodule of a class by ``make(name, module)``        |
| ``fold_batchnorm(model, example)``         | fold every eval-mode BatchNorm into the conv (or transposed conv)   |
|                                            | that feeds it                                                       |
| ``fold_weight_norm(model)``                | make every weight-normalized weight a plain Parameter (g v / |v|)   |
| ``patch_class(module, forward)``           | give one module a subclass with another ``forward``; weights, names |
|                                            | and ``isinstance`` checks stay                                      |
| ``register_product_patch(cls, forward)``   | teach ``patch_products`` the products inside a module class         |
| ``patch_products(model, make_product)``    | install product modules (``matmul_qk``, ``matmul_av``) in every     |
|                                            | registered module and switch it to the registered forward           |

Products (attention's q @ k^T and attn @ v, or elementwise products) are computed inside a module's ``forward``
by tensor operators, so no module swap reaches them. A *product patch* is a replacement ``forward`` that
computes them with child modules instead (``self.matmul_qk(q, k_t)``, ``self.matmul_av(attn, v)``); the product
modules (``polyquant.nn.QuantMatMul`` or a subclass) carry the operand quantizers. Every plugin names its
products with ``PRODUCT_NAMES``, so a quantizer of attention's first product is always
``<attention>.matmul_qk.a_quantizer``.

    register_product_patch(timm.layers.Attention, my_attention_forward)
    patch_products(model, lambda site: QuantMatMul(a=spec, b=spec, name=site.name))
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .nn import QuantMatMul, default_forward, set_submodule

__all__ = [
    "PRODUCT_NAMES",
    "ProductPatch",
    "ProductSite",
    "PRODUCT_PATCHES",
    "set_submodule",
    "replace_modules",
    "fold_batchnorm",
    "patch_class",
    "register_product_patch",
    "patch_products",
    "is_product_patched",
]

PRODUCT_NAMES = ("matmul_qk", "matmul_av")  # first and second product of an attention module, in forward order


# --- BatchNorm folding ------------------------------------------------------------------------------------------


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + _TRANSPOSED


@contextmanager
def _exact_fp32() -> Iterator[None]:
    """Full-precision fp32 convolutions and matmuls on CUDA (no TF32) while fold_batchnorm compares outputs:
    TF32 alone moves a conv stack's output by ~1e-3, more than the check allows."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: Any) -> list[str]:
    """Fold every eval-mode BatchNorm1d / 2d / 3d whose input is exactly the output of a Conv1d / 2d / 3d or
    ConvTranspose1d / 2d / 3d into that conv; in place.

    One forward of ``example`` (any input the model accepts, fed as ``polyquant.nn.default_forward`` does: a
    tensor, a dict of keyword arguments or a tuple whose first element is the input; its values do not change
    the result) finds the (conv, BN) pairs by tensor identity (the BN's input *is* the conv's output), so it
    works for any module nesting (timm ``ConvNormAct`` / ``BatchNormAct2d``, ``ConvNorm``, ``nn.Sequential``
    stems, PointPillars' 1x1 Conv1d + BatchNorm1d PFN, a transposed-conv upsampling neck).
    W' = W * gamma / sqrt(var + eps) along the output channels (dim 0 of a conv's weight, dim 1 of a transposed
    conv's), b' = (b - mean) * gamma / sqrt(var + eps) + beta. A plain BN becomes
    ``nn.Identity``; timm's ``BatchNormAct2d`` keeps its dropout and activation. A conv that feeds two BNs is left
    alone; a second forward checks that the output did not change (a folded conv whose output has another
    consumer). Returns the names of the folded convs. The model must be in eval mode (running statistics).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs the model in eval mode (BN uses its running statistics)")
    outputs: dict[int, tuple[str, Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    seen_bn: set[str] = set()
    hooks = []
    names = {id(m): n for n, m in model.named_modules()}

    def conv_hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        outputs[id(out)] = (names[id(module)], out)

    def bn_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        name = names[id(module)]
        hit = outputs.get(id(args[0]))
        if name not in seen_bn and hit is not None and hit[1] is args[0]:
            pairs.append((hit[0], name))
        seen_bn.add(name)

    for m in model.modules():
        if type(m) in _FOLDABLE_CONVS:
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            hooks.append(m.register_forward_pre_hook(bn_hook))
    try:
        with _exact_fp32():
            reference = default_forward(model, example)
    finally:
        for h in hooks:
            h.remove()
    convs_used: dict[str, int] = {}
    for conv_name, _ in pairs:
        convs_used[conv_name] = convs_used.get(conv_name, 0) + 1
    folded = []
    for conv_name, bn_name in pairs:
        if convs_used[conv_name] != 1:
            continue  # one conv feeding two BNs: not foldable
        if isinstance(model.get_submodule(conv_name), _TRANSPOSED) and model.get_submodule(conv_name).groups != 1:
            continue  # a grouped transposed conv's weight mixes groups along dim 1: not folded
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:
            continue
        w = conv.weight
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        inv = gamma / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        axis = 1 if isinstance(conv, _TRANSPOSED) else 0  # output channels (groups=1)
        shape = [1] * w.dim()
        shape[axis] = -1
        conv.weight = nn.Parameter((w * inv.view(shape)).detach().clone())
        conv.bias = nn.Parameter(((bias - bn.running_mean) * inv + beta).detach().clone())
        replacement: nn.Module = nn.Identity()
        if hasattr(bn, "act"):  # timm BatchNormAct2d: bn -> drop -> act
            replacement = nn.Sequential(getattr(bn, "drop", nn.Identity()), bn.act)
        set_submodule(model, bn_name, replacement)
        folded.append(conv_name)
    if folded and isinstance(reference, Tensor):
        with _exact_fp32():
            got = default_forward(model, example)
        tol = 1e-4 * max(1.0, float(reference.abs().max()))
        if not torch.allclose(got, reference, rtol=1e-4, atol=tol):
            change = float((got - reference).abs().max())
            raise RuntimeError(f"folding BatchNorm changed the model output by {change:.3g}; a folded conv's "
                               "output is probably used elsewhere too")
    return folded


# --- class patching ---------------------------------------------------------------------------------------------

_PATCHED: dict[tuple[type, Callable[..., Any]], type] = {}  # (class, forward) -> subclass, one per pair


def fold_weight_norm(model: nn.Module) -> list[str]:
    """Replace every weight normalization (``torch.nn.utils.parametrizations.weight_norm`` and the older
    ``torch.nn.utils.weight_norm`` hook) by the plain weight it computes, ``g v / |v|``, in place: quant layers copy
    ``module.weight``, which a normalization recomputes from ``weight_g`` / ``weight_v`` (or ``original0`` /
    ``original1``) on every call. The forward is unchanged. Returns the names of the modules folded."""
    from torch.nn.utils import parametrize

    folded = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            folded.append(name)
            continue
        if hasattr(module, "weight_g") and hasattr(module, "weight_v"):  # the older hook
            torch.nn.utils.remove_weight_norm(module)
            folded.append(name)
    return folded


def replace_modules(model: nn.Module, cls: type[nn.Module] | tuple[type[nn.Module], ...],
                    make: Callable[[str, nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Replace every submodule of ``model`` that is an instance of ``cls`` by ``make(name, module)`` (in place) and
    return the replacements by dotted name. Matches are collected before any replacement, so a replacement's own
    children are not visited; the root itself is never replaced (``ValueError`` when it matches)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]
    if any(name == "" for name, _ in found):
        raise ValueError(f"the root module is a {type(model).__name__}: wrap it in a container to replace it")
    out = {}
    for name, m in found:
        if any(name.startswith(f"{done}.") for done in out):  # inside a module already replaced
            continue
        out[name] = make(name, m)
        set_submodule(model, name, out[name])
    return out


def patch_class(module: nn.Module, forward: Callable[..., Any]) -> nn.Module:
    """Switch ``module`` (in place) to a subclass of its class whose ``forward`` is ``forward``; returns it.

    The subclass (``Quant<Class>``) is made once per (class, forward) pair, so modules patched alike share a
    class. Parameters, buffers, names and ``isinstance(module, OriginalClass)`` are unchanged; a module already
    patched with ``forward`` is left as it is.
    """
    cls = type(module)
    if getattr(cls, "__polyquant_patched__", None) is not None:
        base = cls.__polyquant_patched__
        if _PATCHED.get((base, forward)) is cls:
            return module
        cls = base
    key = (cls, forward)
    if key not in _PATCHED:
        _PATCHED[key] = type(f"Quant{cls.__name__}", (cls,), {
            "forward": forward,
            "__module__": getattr(forward, "__module__", __name__),
            "__polyquant_patched__": cls,
        })
    module.__class__ = _PATCHED[key]
    return module


def is_product_patched(module: nn.Module) -> bool:
    """True if ``module``'s class was made by ``patch_class`` (its products are quantized modules)."""
    return getattr(type(module), "__polyquant_patched__", None) is not None


# --- product patches --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProductPatch:
    """How the products inside one module class are quantized.

    Args:
        forward: replacement ``forward`` of the class; it computes each product with ``self.<name>(a, b)`` for
            the names in ``products``.
        product: the product module type (``QuantMatMul``: a @ b; a subclass for other products, e.g. a * b).
        products: the product attribute names, in forward order.
    """

    forward: Callable[..., Any]
    product: type[QuantMatMul] = QuantMatMul
    products: tuple[str, ...] = PRODUCT_NAMES


@dataclass(frozen=True)
class ProductSite:
    """One product to install: ``make_product`` gets this and returns the product module."""

    module_name: str  # the patched module's name in the model
    module: nn.Module  # the patched module (e.g. to read its number of heads)
    product: str  # the product's attribute name, one of ProductPatch.products
    product_type: type[QuantMatMul]

    @property
    def name(self) -> str:
        """The product module's full name (``<module_name>.<product>``)."""
        return f"{self.module_name}.{self.product}" if self.module_name else self.product


PRODUCT_PATCHES: dict[type[nn.Module], ProductPatch] = {}  # module class -> its product patch


def register_product_patch(cls: type[nn.Module], forward: Callable[..., Any], *,
                           product: type[QuantMatMul] = QuantMatMul,
                           products: tuple[str, ...] = PRODUCT_NAMES) -> None:
    """Register the product patch of module class ``cls`` (see ``ProductPatch``); a second registration of the
    same class warns and replaces the first unless it is identical."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_product_patch needs an nn.Module class, got {cls!r}")
    if not issubclass(product, QuantMatMul):
        raise TypeError(f"product must be QuantMatMul or a subclass, got {product!r}")
    if not products or len(set(products)) != len(products):
        raise ValueError(f"products must be distinct attribute names, got {products!r}")
    patch = ProductPatch(forward, product, tuple(products))
    old = PRODUCT_PATCHES.get(cls)
    if old is not None and old != patch:
        warnings.warn(f"product patch for {cls.__name__} registered twice; the last one wins", stacklevel=2)
    PRODUCT_PATCHES[cls] = patch


def patch_products(
    model: nn.Module,
    make_product: Callable[[ProductSite], QuantMatMul],
    *,
    ignore: Iterable[str] = (),
    classes: Iterable[type[nn.Module]] | None = None,
) -> list[str]:
    """Patch every module of ``model`` whose class has a registered product patch; in place.

    For each such module (in module order): ``make_product(site)`` is installed as ``module.<product>`` for every
    product name, then the module switches to the registered forward (``patch_class``). ``ignore``: fnmatch
    patterns of module names left alone; ``classes``: patch only these registered classes (None: all).
    Returns the names of the patched modules.
    """
    ignore = list(ignore)
    allowed = None if classes is None else set(classes)
    unknown = [c.__name__ for c in allowed or () if c not in PRODUCT_PATCHES]
    if unknown:
        raise ValueError(f"no product patch registered for {unknown}; call register_product_patch first")
    patched = []
    for name, module in list(model.named_modules()):
        cls = type(module)
        patch = PRODUCT_PATCHES.get(cls)
        if patch is None or (allowed is not None and cls not in allowed):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in ignore):
            continue
        for product in patch.products:
            new = make_product(ProductSite(name, module, product, patch.product))
            if not isinstance(new, QuantMatMul):
                raise TypeError(f"make_product must return a QuantMatMul for {name}.{product}, got "
                                f"{type(new).__name__}")
            setattr(module, product, new)
        patch_class(module, patch.forward)
        patched.append(name)
    return patched
