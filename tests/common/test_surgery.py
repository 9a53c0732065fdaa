"""polyquant.surgery: set_submodule, BatchNorm folding, class patching and the product-patch registry."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from polyquant.nn import QuantMatMul, QuantSpec
from polyquant.surgery import (
    replace_modules,
    PRODUCT_NAMES,
    PRODUCT_PATCHES,
    ProductSite,
    fold_batchnorm,
    is_product_patched,
    patch_class,
    patch_products,
    register_product_patch,
    set_submodule,
)

# --- set_submodule ---------------------------------------------------------------------------------------------


def _nested() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(3, 3))))


def test_set_submodule_on_nested_names() -> None:
    model = _nested()
    new = nn.Identity()
    set_submodule(model, "1.1.0", new)
    assert model[1][1][0] is new
    set_submodule(model, "0", nn.Tanh())
    assert isinstance(model[0], nn.Tanh)
    assert [n for n, _ in model.named_modules()] == ["", "0", "1", "1.0", "1.1", "1.1.0"]


def test_set_submodule_errors_on_bad_names() -> None:
    model = _nested()
    with pytest.raises(ValueError, match="root"):
        set_submodule(model, "", nn.Identity())
    with pytest.raises(AttributeError):
        set_submodule(model, "1.7.0", nn.Identity())  # no child "7"
    with pytest.raises(ValueError, match="dot"):
        set_submodule(model, "1.", nn.Identity())
    with pytest.raises(TypeError, match="nn.Module"):
        set_submodule(model, "0", torch.zeros(1))  # type: ignore[arg-type]


# --- BatchNorm folding -------------------------------------------------------------------------------------------


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    bn = net[1]
    bn.running_mean.copy_(torch.randn(4))
    bn.running_var.copy_(torch.rand(4) + 0.5)
    bn.weight.data.copy_(torch.randn(4))
    bn.bias.data.copy_(torch.randn(4))
    return net.eval()


def test_fold_batchnorm_equals_conv_then_bn() -> None:
    net = _conv_bn()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = net(x)
    folded = copy.deepcopy(net)
    assert fold_batchnorm(folded, x[:1]) == ["0"]
    assert isinstance(folded[1], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(folded(x), ref, atol=1e-5)
    # by hand: W' = W * g / sqrt(v + eps), b' = (b - mean) * g / sqrt(v + eps) + beta
    conv, bn = net[0], net[1]
    inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(folded[0].weight, conv.weight * inv[:, None, None, None])
    assert torch.allclose(folded[0].bias, (conv.bias - bn.running_mean) * inv + bn.bias)


def test_fold_batchnorm_result_does_not_depend_on_the_example() -> None:
    net = _conv_bn()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    fold_batchnorm(a, torch.zeros(1, 3, 5, 5))
    fold_batchnorm(b, torch.randn(3, 3, 8, 8))
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[0].bias, b[0].bias)


def test_fold_batchnorm_skips_unfoldable_and_needs_eval() -> None:
    class TwoBN(nn.Module):  # one conv feeding two BNs: not foldable
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.bn1, self.bn2 = nn.BatchNorm2d(2), nn.BatchNorm2d(2)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return self.bn1(y) + self.bn2(y)

    net = TwoBN().eval()
    assert fold_batchnorm(net, torch.randn(1, 1, 3, 3)) == []
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(_conv_bn().train(), torch.randn(1, 3, 5, 5))


# --- class patching and the product registry ---------------------------------------------------------------------


class TinyAttention(nn.Module):
    """q @ k^T then attn @ v, computed with tensor operators (what a product patch replaces)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def _tiny_attention_forward(self: TinyAttention, x: Tensor) -> Tensor:
    q, k, v = self.qkv(x).chunk(3, dim=-1)
    return self.matmul_av(self.matmul_qk(q, k.transpose(-2, -1)).softmax(-1), v)


class Recorder(QuantMatMul):
    """A product that records its operands (to check which matmul each product wraps)."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        self.seen.append((a, b))
        return super().forward(a, b)


@pytest.fixture()
def tiny_registered():
    register_product_patch(TinyAttention, _tiny_attention_forward)
    yield
    PRODUCT_PATCHES.pop(TinyAttention, None)


def test_patch_class_keeps_weights_names_and_isinstance() -> None:
    m = TinyAttention()

    def forward(self: TinyAttention, x: Tensor) -> Tensor:
        return self.qkv(x) * 2

    w = m.qkv.weight
    patch_class(m, forward)
    assert isinstance(m, TinyAttention) and type(m) is not TinyAttention and is_product_patched(m)
    assert type(m).__name__ == "QuantTinyAttention"
    assert m.qkv.weight is w
    x = torch.randn(2, 4)
    assert torch.equal(m(x), m.qkv(x) * 2)
    other = patch_class(TinyAttention(), forward)
    assert type(other) is type(m)  # one subclass per (class, forward)
    patch_class(m, forward)  # idempotent
    assert type(m).__mro__[1] is TinyAttention
    assert not is_product_patched(TinyAttention())


def test_patch_products_wraps_the_right_matmuls(tiny_registered) -> None:
    model = nn.Sequential(TinyAttention(), nn.Sequential(TinyAttention()))
    ref = copy.deepcopy(model)
    sites: list[ProductSite] = []

    def make(site: ProductSite) -> QuantMatMul:
        sites.append(site)
        return Recorder(site.name)

    assert patch_products(model, make) == ["0", "1.0"]
    assert [s.name for s in sites] == ["0.matmul_qk", "0.matmul_av", "1.0.matmul_qk", "1.0.matmul_av"]
    assert all(s.product_type is QuantMatMul for s in sites) and sites[0].module is model[0]
    assert PRODUCT_NAMES == ("matmul_qk", "matmul_av")
    names = [n for n, m in model.named_modules() if isinstance(m, QuantMatMul)]
    assert names == ["0.matmul_qk", "0.matmul_av", "1.0.matmul_qk", "1.0.matmul_av"]
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # products without quantizers: the same computation
    attn = model[0]
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    a, b = attn.matmul_qk.seen[0]
    assert torch.equal(a, q) and torch.equal(b, k.transpose(-2, -1))
    a, b = attn.matmul_av.seen[0]
    assert torch.equal(b, v) and torch.allclose(a.sum(-1), torch.ones(2, 5))  # softmax rows
    # already patched modules are left alone; ignore and classes filter
    assert patch_products(model, make) == []
    fresh = nn.Sequential(TinyAttention(), TinyAttention())
    assert patch_products(fresh, make, ignore=["1"]) == ["0"]
    with pytest.raises(ValueError, match="no product patch"):
        patch_products(fresh, make, classes=[nn.Linear])


def test_patched_products_quantize_their_operands(tiny_registered) -> None:
    model = TinyAttention()
    spec = QuantSpec("int4")
    patch_products(model, lambda site: QuantMatMul(a=spec, b=spec, name=site.name))
    assert model.matmul_qk.a_quantizer.name == "matmul_qk.a"
    for q in (model.matmul_qk.a_quantizer, model.matmul_qk.b_quantizer):
        q.freeze(torch.tensor(0.25))
        q.set_state("quantized")
    x = torch.randn(3, 4)
    q, k, v = model.qkv(x).chunk(3, dim=-1)
    qq = torch.clamp(torch.round(q / 0.25), -8, 7) * 0.25
    kq = torch.clamp(torch.round(k.transpose(-2, -1) / 0.25), -8, 7) * 0.25
    with torch.no_grad():
        assert torch.allclose(model(x), (qq @ kq).softmax(-1) @ v)


def test_register_product_patch_validates_and_warns(tiny_registered) -> None:
    register_product_patch(TinyAttention, _tiny_attention_forward)  # identical: silent
    with pytest.warns(UserWarning, match="twice"):
        register_product_patch(TinyAttention, lambda self, x: x)
    with pytest.raises(TypeError, match="nn.Module class"):
        register_product_patch(int, _tiny_attention_forward)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="QuantMatMul"):
        register_product_patch(TinyAttention, _tiny_attention_forward, product=nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct"):
        register_product_patch(TinyAttention, _tiny_attention_forward, products=("m", "m"))
    with pytest.warns(UserWarning, match="twice"):
        register_product_patch(TinyAttention, _tiny_attention_forward)
    with pytest.raises(TypeError, match="must return a QuantMatMul"):
        patch_products(TinyAttention(), lambda site: nn.Identity())  # type: ignore[arg-type,return-value]


def test_fold_batchnorm_checks_in_full_fp32_and_restores_tf32_flags() -> None:
    # TF32 convolutions on a GPU move outputs by ~1e-3, beyond the fold check: the check runs without TF32
    # and leaves the user's settings as they were.
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        seen = []
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        model[0].register_forward_hook(lambda *a: seen.append(torch.backends.cudnn.allow_tf32))
        assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) == ["0"]
        assert seen and not any(seen)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def test_replace_modules_replaces_every_match_once_and_returns_them() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), nn.Tanh())
    seen: list[str] = []

    def make(name: str, m: nn.Module) -> nn.Module:
        seen.append(name)
        wrapped = nn.Sequential(m)  # holds the original (a Linear): not visited again
        return wrapped

    out = replace_modules(model, nn.Linear, make)
    assert seen == ["0", "1.1"] and list(out) == ["0", "1.1"]
    assert model[0] is out["0"] and model[1][1] is out["1.1"]
    assert type(model[0][0]) is nn.Linear and type(model[2]) is nn.Tanh
    x = torch.randn(3, 4)
    assert model(x).shape == (3, 2)
    assert replace_modules(model, nn.Conv1d, make) == {}
    # a match inside a module replaced in the same call is not replaced again (its parent is gone)
    nested = nn.ModuleDict({"a": nn.Sequential(nn.Sequential(nn.ReLU()))})
    out = replace_modules(nested, nn.Sequential, lambda name, m: nn.Identity())
    assert list(out) == ["a"] and type(nested["a"]) is nn.Identity
    with pytest.raises(ValueError, match="root module"):
        replace_modules(nn.Linear(2, 2), nn.Linear, make)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # the older hook
def test_fold_weight_norm_keeps_the_forward_and_makes_plain_weights() -> None:
    from polyquant.surgery import fold_weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3)),
                          nn.utils.weight_norm(nn.ConvTranspose1d(4, 2, 4, stride=2)), nn.Linear(5, 5))
    x = torch.randn(2, 3, 9)
    with torch.no_grad():
        ref = model[1](model[0](x))
    assert fold_weight_norm(model) == ["0", "1"]
    assert all(isinstance(m.weight, nn.Parameter) for m in model)
    assert not hasattr(model[1], "weight_g") and not nn.utils.parametrize.is_parametrized(model[0])
    with torch.no_grad():
        assert torch.allclose(model[1](model[0](x)), ref, atol=1e-6)
    assert fold_weight_norm(model) == []


def test_fold_batchnorm_conv1d_and_transposed_conv_by_hand() -> None:
    # PointPillars' PFN (1x1 Conv1d + BatchNorm1d) and an upsampling neck (ConvTranspose2d + BatchNorm2d), fed a
    # dict of keyword inputs as polyquant.nn.default_forward does.
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pfn = nn.Conv1d(3, 4, 1, bias=False)
            self.bn1 = nn.BatchNorm1d(4)
            self.up = nn.ConvTranspose2d(4, 5, 2, stride=2)
            self.bn2 = nn.BatchNorm2d(5)

        def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
            y = self.bn1(self.pfn(x * scale))  # (B, 4, 16)
            return self.bn2(self.up(y.reshape(-1, 4, 4, 4)))

    net = Net()
    for bn in (net.bn1, net.bn2):
        c = bn.num_features
        bn.running_mean.copy_(torch.randn(c))
        bn.running_var.copy_(torch.rand(c) + 0.5)
        bn.weight.data.copy_(torch.randn(c))
        bn.bias.data.copy_(torch.randn(c))
    net.eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        ref = net(x)
    folded = copy.deepcopy(net)
    assert sorted(fold_batchnorm(folded, {"x": x[:1]})) == ["pfn", "up"]
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    with torch.no_grad():
        assert torch.allclose(folded(x), ref, atol=1e-5)
    inv = net.bn2.weight / torch.sqrt(net.bn2.running_var + net.bn2.eps)
    # a transposed conv's output channels are dim 1 of its weight (in, out, kh, kw)
    assert torch.allclose(folded.up.weight, net.up.weight * inv[None, :, None, None])
    assert torch.allclose(folded.up.bias, (net.up.bias - net.bn2.running_mean) * inv + net.bn2.bias)
    inv1 = net.bn1.weight / torch.sqrt(net.bn1.running_var + net.bn1.eps)
    assert torch.allclose(folded.pfn.bias, -net.bn1.running_mean * inv1 + net.bn1.bias)
