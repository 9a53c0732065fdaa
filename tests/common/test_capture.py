"""polyquant.capture on hand-checkable models: exact captured values, clone-on-capture, gradients against autograd
by hand, calls per forward, early stop, hooks removed on every exit, the memory bound, offload."""

from __future__ import annotations

from collections import namedtuple
from typing import Any, Iterator

import pytest
import torch
from torch import Tensor, nn

from polyquant.capture import Call, CaptureLimitError, Captured, capture


def _linear(weight: list[list[float]], bias: list[float] | None = None) -> nn.Linear:
    w = torch.tensor(weight)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(torch.tensor(bias))
    return lin


def _net() -> nn.Sequential:
    # x (B, 2) -> fc0: [x0 + x1, x0 - x1] + [0, 1] -> relu -> fc2: 2 h0 - h1
    return nn.Sequential(_linear([[1.0, 1.0], [1.0, -1.0]], [0.0, 1.0]), nn.ReLU(), _linear([[2.0, -1.0]]))


X1 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
X2 = torch.tensor([[-2.0, 0.0]])


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- values --------------------------------------------------------------------------------------------------


def test_inputs_and_outputs_are_exact_and_concatenated_over_batches() -> None:
    net = _net()
    caps = capture(net, ["0", "1", "2"], [X1, X2])
    assert set(caps) == {"0", "1", "2"} and all(isinstance(c, Captured) for c in caps.values())
    # fc0: [1+2, 1-2+1] = [3, 0]; [3-1, 3+1+1] = [2, 5]; [-2, -2+1] = [-2, -1]
    fc0 = torch.tensor([[3.0, 0.0], [2.0, 5.0], [-2.0, -1.0]])
    assert torch.equal(caps["0"].input(0), torch.cat([X1, X2]))
    assert torch.equal(caps["0"].output(), fc0)
    assert torch.equal(caps["1"].output(), fc0.clamp(min=0))
    assert torch.equal(caps["2"].output(), torch.tensor([[6.0], [-1.0], [0.0]]))  # 2 h0 - h1
    assert [c.batch for c in caps["2"].calls] == [0, 1]
    assert caps["0"].num_samples == 3
    assert caps["0"].nbytes == 2 * 3 * 2 * 4  # input and output, (3, 2) float32 each
    assert all(t.device.type == "cpu" and not t.requires_grad for c in caps.values()
               for t in (c.input(0), c.output()))
    assert _no_hooks(net)


def test_captures_are_copies_that_later_in_place_ops_cannot_alter() -> None:
    net = nn.Sequential(_linear([[1.0, 0.0], [0.0, 1.0]]), nn.ReLU(inplace=True))
    x = torch.tensor([[-1.0, 2.0]])
    caps = capture(net, ["0", "1"], [x])
    assert torch.equal(caps["0"].output(), torch.tensor([[-1.0, 2.0]]))  # the ReLU ran in place afterwards
    assert torch.equal(caps["1"].input(0), torch.tensor([[-1.0, 2.0]]))  # taken before the module ran
    assert torch.equal(caps["1"].output(), torch.tensor([[0.0, 2.0]]))
    x.mul_(10)
    assert torch.equal(caps["0"].input(0), torch.tensor([[-1.0, 2.0]]))  # not a view of the caller's batch


def test_keyword_inputs_tuple_outputs_and_forward_fn() -> None:
    Pair = namedtuple("Pair", ["sum", "diff"])

    class Block(nn.Module):
        def forward(self, x: Tensor, *, shift: Tensor, scale: float = 1.0) -> Pair:
            return Pair(x * scale + shift, x - shift)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()

        def forward(self, x: Tensor, shift: Tensor) -> Tensor:
            return self.block(x, shift=shift, scale=2.0).sum

    batches = [{"x": torch.tensor([[1.0, 2.0]]), "shift": torch.tensor([0.5, 0.5])}]
    caps = capture(Net(), ["block"], batches, forward_fn=lambda m, b: m(b["x"], b["shift"]))
    call = caps["block"].calls[0]
    assert torch.equal(call.args[0], torch.tensor([[1.0, 2.0]])) and call.kwargs["scale"] == 2.0
    assert torch.equal(caps["block"].input("shift"), torch.tensor([0.5, 0.5]))
    assert isinstance(call.output, Pair)  # the output's structure is kept
    assert torch.equal(caps["block"].output(0), torch.tensor([[2.5, 4.5]]))
    assert torch.equal(caps["block"].output(1), torch.tensor([[0.5, 1.5]]))
    with pytest.raises(ValueError, match="index="):
        caps["block"].output()
    # The default forward feeds a dict batch as keyword arguments.
    caps = capture(Net(), ["block"], [{"x": torch.ones(1, 2), "shift": torch.zeros(2)}], inputs=False)
    assert caps["block"].calls[0].args == () and torch.equal(caps["block"].output(0), 2 * torch.ones(1, 2))


# --- calls per forward and early stop ------------------------------------------------------------------------


class _Twice(nn.Module):
    """Calls the same layer twice per forward: y = fc(fc(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = _linear([[2.0]], [1.0])

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.fc(x))


def test_modules_called_several_times_per_forward() -> None:
    x = torch.tensor([[1.0], [0.0]])
    every = capture(_Twice(), ["fc"], [x, x])
    # call 1: 2x + 1 = [3, 1]; call 2: [7, 3]; two calls per batch, in order
    assert [c.batch for c in every["fc"].calls] == [0, 0, 1, 1]
    assert torch.equal(every["fc"].output(), torch.tensor([[3.0], [1.0], [7.0], [3.0]] * 2))
    first = capture(_Twice(), ["fc"], [x, x], calls="first")
    assert [c.batch for c in first["fc"].calls] == [0, 1]
    assert torch.equal(first["fc"].input(0), torch.cat([x, x]))
    assert torch.equal(first["fc"].output(), torch.tensor([[3.0], [1.0]] * 2))


class _Boom(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise AssertionError("a module after the captured one ran")


def test_early_stop_runs_nothing_after_the_captured_modules() -> None:
    net = nn.Sequential(_linear([[1.0, 1.0], [1.0, -1.0]]), nn.ReLU(), _Boom())
    caps = capture(net, ["0", "1"], [X1], calls="first", early_stop=True)
    assert torch.equal(caps["1"].output(), torch.tensor([[3.0, 0.0], [2.0, 4.0]]))
    # Inputs only: the forward stops before the module itself runs.
    net[1] = _Boom()
    caps = capture(net, ["1"], [X1, X2], outputs=False, calls="first", early_stop=True)
    assert torch.equal(caps["1"].input(0), torch.tensor([[3.0, -1.0], [2.0, 4.0], [-2.0, -2.0]]))
    assert caps["1"].calls[0].output is None and _no_hooks(net)
    with pytest.raises(ValueError, match="early_stop"):
        capture(net, ["1"], [X1], early_stop=True)  # calls="all"


# --- gradients -----------------------------------------------------------------------------------------------


def test_output_gradients_equal_autograd_by_hand() -> None:
    net = _net()
    target = torch.tensor([[1.0], [1.0]])

    def loss_fn(out: Tensor, batch: Tensor) -> Tensor:
        return (out - target).pow(2).sum()

    caps = capture(net, ["0", "2"], [X1], loss_fn=loss_fn, inputs=False)
    # y = [6, -1]: dL/dy = 2 (y - 1) = [10, -4]; dL/dh = dL/dy * [2, -1]; relu passes where fc0 > 0
    dy = torch.tensor([[10.0], [-4.0]])
    dh = dy * torch.tensor([[2.0, -1.0]])
    d0 = dh * torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # fc0 = [[3, 0], [2, 5]]: relu'(0) = 0
    assert torch.equal(caps["2"].grad(), dy)
    assert torch.equal(caps["0"].grad(), d0)
    # The same by autograd directly.
    h0 = net[0](X1)
    (g,) = torch.autograd.grad(loss_fn(net[2](net[1](h0)), X1), h0)
    assert torch.equal(caps["0"].grad(), g)
    assert all(p.grad is None for p in net.parameters())  # no parameter gradient is touched
    assert torch.is_grad_enabled()  # the grad mode is restored
    assert caps["0"].calls[0].args == () and torch.equal(caps["0"].output(), torch.tensor([[3.0, 0.0], [2.0, 5.0]]))


def test_gradients_of_a_frozen_model_and_of_outputs_that_miss_the_loss() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = _linear([[3.0]])
            self.side = _linear([[1.0]])

        def forward(self, x: Tensor) -> Tensor:
            self.side(x)  # its output does not reach the loss
            return self.a(x) * self.a(x)  # y = (3x)^2 via two calls

    net = Net().requires_grad_(False)
    x = torch.tensor([[2.0]])
    caps = capture(net, ["a", "side"], [x], loss_fn=lambda out, b: out.sum(), outputs=False, inputs=False)
    # each call's output is 3x = 6; dy/d(first) = second = 6, and the same for the second
    assert [c.grad.tolist() for c in caps["a"].calls] == [[[6.0]], [[6.0]]]
    assert torch.equal(caps["side"].grad(), torch.zeros(1, 1))
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())


def test_loss_sees_the_batch_and_forward_output() -> None:
    net = _net()
    batches = [(X1, torch.tensor([[0.0], [0.0]])), (X2, torch.tensor([[1.0]]))]
    caps = capture(net, ["2"], batches, loss_fn=lambda out, b: (out - b[1]).sum(), outputs=False)
    assert torch.equal(caps["2"].grad(), torch.ones(3, 1))
    assert torch.equal(caps["2"].input(0), torch.tensor([[3.0, 0.0], [2.0, 5.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="scalar"):
        capture(net, ["2"], [X1], loss_fn=lambda out, b: out)


def test_grad_is_none_without_a_loss_and_for_integer_outputs() -> None:
    class ArgMax(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.argmax(-1)

    net = nn.Sequential(nn.Identity(), ArgMax())
    assert capture(net, ["0"], [X1])["0"].grad() is None
    caps = capture(net, ["1"], [X1], loss_fn=lambda out, b: out.float().sum())
    assert caps["1"].calls[0].grad is None and torch.equal(caps["1"].output(), torch.tensor([1, 0]))


# --- hooks, errors, limits, offload --------------------------------------------------------------------------


def test_hooks_are_removed_after_an_exception() -> None:
    net = nn.Sequential(_linear([[1.0, 1.0]]), _Boom())
    with pytest.raises(AssertionError, match="ran"):
        capture(net, ["0", "1"], [X1])
    assert _no_hooks(net)

    def batches() -> Iterator[Tensor]:
        yield X1
        raise KeyError("loader failed")

    with pytest.raises(KeyError):
        capture(net[:1], ["0"], batches())
    assert _no_hooks(net)


def test_errors_name_the_problem() -> None:
    net = _net()
    with pytest.raises(ValueError, match=r"no module named '00'; did you mean \['0'"):
        capture(net, ["00"], [X1])
    with pytest.raises(ValueError, match="duplicate"):
        capture(net, ["0", "0"], [X1])
    with pytest.raises(TypeError, match="single string"):
        capture(net, "0", [X1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        capture(net, ["0"], [])
    with pytest.raises(ValueError, match="nothing to capture"):
        capture(net, ["0"], [X1], inputs=False, outputs=False)
    with pytest.raises(ValueError, match="calls"):
        capture(net, ["0"], [X1], calls="last")  # type: ignore[arg-type]

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:
            return x

    with pytest.raises(ValueError, match="not called"):
        capture(Skip(), ["unused"], [X1])
    assert _no_hooks(net)


def test_max_bytes_is_enforced_before_copying() -> None:
    net = _net()
    per_batch = 2 * 2 * 4  # the input of "0" for X1: (2, 2) float32
    caps = capture(net, ["0"], [X1, X1], outputs=False, max_bytes=2 * per_batch)
    assert caps["0"].nbytes == 2 * per_batch
    with pytest.raises(CaptureLimitError, match="max_bytes=31.*batch 1"):
        capture(net, ["0"], [X1, X1], outputs=False, max_bytes=2 * per_batch - 1)
    assert _no_hooks(net)


def test_max_samples_stops_reading_batches() -> None:
    read: list[int] = []

    def batches() -> Iterator[Tensor]:
        for i in range(10):
            read.append(i)
            yield torch.full((3, 2), float(i))

    caps = capture(_net(), ["0"], batches(), max_samples=5)
    assert read == [0, 1] and caps["0"].num_samples == 6  # whole batches: 3 + 3 >= 5


def test_offload_device() -> None:
    net = _net()
    assert capture(net, ["0"], [X1])["0"].output().device.type == "cpu"  # default: "cpu"
    on_meta = capture(net, ["0"], [X1], offload="meta", loss_fn=lambda out, b: out.sum())["0"]
    assert {t.device.type for t in (on_meta.input(0), on_meta.output(), on_meta.grad())} == {"meta"}
    kept = capture(net, ["0"], [X1], offload=None)["0"]
    assert kept.output().device == X1.device


@pytest.mark.gpu
def test_offload_to_cpu_while_computing_on_cuda() -> None:
    net = _net().cuda()
    caps = capture(net, ["0"], [X1.cuda()], loss_fn=lambda out, b: out.sum())["0"]
    assert {t.device.type for t in (caps.input(0), caps.output(), caps.grad())} == {"cpu"}
    assert torch.equal(caps.output(), torch.tensor([[3.0, 0.0], [2.0, 5.0]]))
    on_gpu = capture(net, ["0"], [X1.cuda()], offload=None)["0"]
    assert on_gpu.output().is_cuda


def test_call_is_a_plain_record() -> None:
    call = Call(batch=3)
    assert (call.args, call.kwargs, call.output, call.grad) == ((), {}, None, None)
    empty: Any = Captured("x")
    with pytest.raises(ValueError, match="no call"):
        empty.output()


def test_replace_output_feeds_the_rest_of_the_model_and_its_gradient() -> None:
    from polyquant.capture import replace_output

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    value = torch.randn(5, 4, requires_grad=True)
    with replace_output(model, "0", value):
        out = model(x)
    assert torch.allclose(out, model[2](torch.relu(value)))  # the rest computed from the value
    out.sum().backward()
    assert value.grad is not None and value.grad.abs().sum() > 0
    assert torch.equal(model(x), model[2](torch.relu(model[0](x))))  # the hook is gone
    with pytest.raises(RuntimeError), replace_output(model, "0", value):
        raise RuntimeError("inside")
    assert len(model[0]._forward_hooks) == 0  # removed when the body raises
    with pytest.raises(ValueError, match="no module named"):
        with replace_output(model, "nope", value):
            pass
