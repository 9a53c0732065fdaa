"""torch.compile of the packed modules: every module kind and CPU path as one graph (``fullgraph=True``) with the
inductor backend (generated C++ code), outputs within float rounding of eager; the core's value checks run in
eager mode and step aside while a graph is traced (``polyquant.formats.checking_values``).

Every plugin's packed model is compiled in the contract test (``tests/test_contract.py``, ``aot_eager``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
import torch
from torch import nn

from polyquant.formats import checking_values, get_format
from polyquant.packed import (
    HadamardLinear, Int8Activation, PackedConv, PackedLinear, VQLinear, W8A8Linear, quantize_weight,
)

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="inductor needs a C++ compiler (c++ / g++) on the CPU")

RTOL = 1e-4  # relative L2 error: inductor fuses and reorders the float operations around the same kernels


def _lin() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(128, 64)


MODULES: dict[str, Callable[[], nn.Module]] = {
    "int4 torch cpu gemm (bf16)": lambda: PackedLinear.from_float(_lin(), fmt="int4", group_size=64),
    "int8 torch cpu gemm (bf16)": lambda: PackedLinear.from_float(_lin(), fmt="int8", group_size=None),
    "int4 decode (fp32)": lambda: PackedLinear(quantize_weight(_lin().weight, "int4", 32), _lin().bias,
                                               cpu_dtype=torch.float32),
    "int3 decode": lambda: PackedLinear.from_float(_lin(), fmt="int3", group_size=32),
    "fp4 e2m1 decode": lambda: PackedLinear.from_float(_lin(), fmt="e2m1", group_size=32),
    "nf4 table decode": lambda: PackedLinear.from_float(_lin(), fmt="nf4", group_size=32),
    "w8a8 dynamic": lambda: W8A8Linear(quantize_weight(_lin().weight, "int8", None), _lin().bias,
                                       act=Int8Activation(dynamic=True)),
    "w8a8 static": lambda: W8A8Linear(quantize_weight(_lin().weight, "int8", None), _lin().bias,
                                      act=Int8Activation(dynamic=False, scale=0.03, zero_point=3,
                                                         fmt=get_format("int8"))),
    "hadamard w4": lambda: HadamardLinear.from_float(_lin(), fmt="int4", group_size=64),
    "hadamard w8a8 fused": lambda: HadamardLinear.from_float(_lin(), fmt="int8", group_size=None,
                                                             activations="int8"),
    "vq": lambda: VQLinear.from_float(_lin(), dim=4, codebook_size=16, iters=3),
    "conv int4": lambda: PackedConv(quantize_weight(nn.Conv2d(8, 16, 3).weight, "int4", None), nn.Conv2d(8, 16, 3)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_packed_module_compiles_as_one_graph(name: str) -> None:
    module = MODULES[name]()
    torch.manual_seed(1)
    # a transposed (non-contiguous) input: torch's CPU GEMMs need a contiguous one, which inductor does not keep
    x = torch.randn(2, 8, 6, 6) if isinstance(module, PackedConv) else torch.randn(2, 128, 5).transpose(1, 2)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = module(x)
        got = torch.compile(module, fullgraph=True)(x)
    err = float((got - eager).norm() / eager.norm())
    assert err <= RTOL, f"{name}: compiled vs eager relative error {err:.2e}"
    torch._dynamo.reset()


def test_value_checks_run_eagerly_and_step_aside_in_a_graph() -> None:
    assert checking_values()
    seen: list[bool] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(checking_values())
        return x + 1

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2))
    assert seen == [False]
    with pytest.raises(ValueError, match="codes"):  # eager: an out-of-range code is still refused
        get_format("int4").decode(torch.tensor([16]))
    torch._dynamo.reset()
