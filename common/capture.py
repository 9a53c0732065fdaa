"""Capture the inputs, outputs and output gradients of named modules over calibration batches.

One pass of ``forward_fn(model, batch)`` per batch with hooks on the named modules; every captured tensor is
detached and copied at once (clone-on-capture: later in-place ops of the model cannot alter it), optionally onto
another device (``offload="cpu"`` by default: compute on the GPU, store on the host). The hooks are always removed,
also when the forward raises.

    from polyquant.capture import capture
    caps = capture(model, ["blocks.0", "head"], batches)
    x0 = caps["blocks.0"].input(0)             # positional input 0 of every call, concatenated along dim 0
    y0 = caps["blocks.0"].output()             # (N, ...) the block's outputs

    # Fisher / Hessian-guided metrics: d loss / d output, e.g. a KL to the float logits carried in the batch.
    caps = capture(model, ["blocks.3"], list(zip(images, fp_logits)), forward_fn=lambda m, b: m(b[0]),
                   loss_fn=lambda out, b: kl(out, b[1]), inputs=False, outputs=False)
    g = caps["blocks.3"].grad()

| option          | effect                                                                                        |
|-----------------|-----------------------------------------------------------------------------------------------|
| inputs          | positional and keyword inputs of each call, taken before the module runs                      |
| outputs         | the module's output (a Tensor or a tuple / list / dict of them)                               |
| loss_fn         | ``loss_fn(model_output, batch) -> scalar``: also d loss / d output of each captured call       |
| calls           | "all": every call of a module in a forward; "first": only its first call of each batch        |
| early_stop      | end each forward once every module's first call is captured (before the module when outputs=False) |
| offload         | device the copies are stored on ("cpu"); None keeps them on the device they were computed on |
| max_bytes       | raise ``CaptureLimitError`` before the stored tensors would exceed this many bytes           |
| max_samples     | stop reading batches once every module holds this many samples (whole batches are kept)       |

Without ``loss_fn`` the forwards run under ``torch.no_grad()``; with it, under ``torch.enable_grad()``, and the
gradients are ``torch.autograd.grad(loss, outputs)``: no parameter ``.grad`` is touched and the backward stops at
the captured outputs. A captured float output that does not require grad (a frozen model) is replaced in the
forward by an equal copy that does, so every captured output gets its gradient. The gradient is the one of the
output tensor as the forward left it (keep in-place ops off a captured output). The caller chooses train / eval
mode. Non-tensor inputs are kept as given (not copied).
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from .nn import Calibration, calibration, tensors_in

__all__ = ["Call", "Captured", "CaptureLimitError", "capture", "replace_output"]


class CaptureLimitError(RuntimeError):
    """The captured tensors would exceed ``max_bytes``."""


@dataclass
class Call:
    """One recorded call of a module.

    Args:
        batch: index of the batch (in the order ``batches`` yielded them) whose forward made the call.
        args / kwargs: the call's positional / keyword inputs (copies; empty when ``inputs=False``).
        output: copy of the output (None when ``outputs=False``).
        grad: d loss / d output with the output's structure (zeros where the output does not reach the loss,
            None entries for non-float tensors); None without ``loss_fn``.
    """

    batch: int
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    grad: Any = None


@dataclass
class Captured:
    """Everything captured at one module: its recorded calls, in order."""

    name: str
    calls: list[Call] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes held by the captured tensors."""
        return sum(t.numel() * t.element_size() for c in self.calls
                   for t in tensors_in((c.args, c.kwargs, c.output, c.grad)))

    @property
    def num_samples(self) -> int:
        """Samples captured: the summed dim-0 length of each call's first tensor (0 when there is none)."""
        return sum(_rows(c) for c in self.calls)

    def input(self, key: int | str = 0) -> Tensor:
        """Positional input ``key`` (an int) or keyword input ``key`` (a str) of every call, concatenated on dim 0."""
        parts = []
        for c in self.calls:
            if isinstance(key, str):
                value = c.kwargs.get(key)
            else:
                value = c.args[key] if -len(c.args) <= key < len(c.args) else None
            if not isinstance(value, Tensor):
                raise ValueError(f"module {self.name!r}: input {key!r} of call {len(parts)} is "
                                 f"{type(value).__name__}, not a Tensor (were inputs captured?)")
            parts.append(value)
        return _cat(parts, self.name, f"input {key!r}")

    def output(self, index: int | str | None = None) -> Tensor:
        """The Tensor output of every call (or element ``index`` of a tuple / list / dict output), on dim 0."""
        return _cat([_pick(c.output, index, self.name, "output") for c in self.calls], self.name, "output")

    def grad(self, index: int | str | None = None) -> Tensor | None:
        """d loss / d output of every call, concatenated on dim 0; None if any call has no gradient."""
        parts = [_pick(c.grad, index, self.name, "grad", allow_none=True) for c in self.calls]
        if not parts or any(p is None for p in parts):
            return None
        return _cat(parts, self.name, "grad")  # type: ignore[arg-type]


# --- helpers ---------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook to end the forward pass once everything of the batch is captured."""


def _map(fn: Callable[[Tensor], Any], x: Any) -> Any:
    """``x`` with every tensor inside (nested tuples / lists / dicts) replaced by ``fn(tensor)``."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, tuple):
        values = [_map(fn, v) for v in x]
        return type(x)(*values) if hasattr(x, "_fields") else tuple(values)  # keeps named tuples
    if isinstance(x, list):
        return [_map(fn, v) for v in x]
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    return x


def _needs_grad(t: Tensor) -> bool:
    return not t.requires_grad and (t.is_floating_point() or t.is_complex())


def _rows(call: Call) -> int:
    for t in tensors_in((call.args, call.kwargs, call.output, call.grad)):
        return int(t.shape[0]) if t.dim() > 0 else 1
    return 0


def _pick(value: Any, index: int | str | None, name: str, what: str, allow_none: bool = False) -> Tensor | None:
    if index is not None and isinstance(value, (tuple, list, dict)):
        value = value[index]
    if value is None and allow_none:
        return None
    if not isinstance(value, Tensor):
        hint = " (pass index= for a tuple / list / dict output)" if index is None else ""
        raise ValueError(f"module {name!r}: the {what} is {type(value).__name__}, not a Tensor{hint}")
    return value


def _cat(parts: list[Tensor], name: str, what: str) -> Tensor:
    if not parts:
        raise ValueError(f"module {name!r}: no call was captured")
    if any(p.dim() == 0 for p in parts):
        raise ValueError(f"module {name!r}: the {what} is a scalar; read the calls one by one")
    return torch.cat(parts, 0)


class _Store:
    """Copies tensors (detach + copy, optionally to another device) and keeps the byte count under a limit."""

    def __init__(self, offload: torch.device | None, max_bytes: int | None) -> None:
        self.offload = offload
        self.max_bytes = max_bytes
        self.nbytes = 0

    def copy(self, x: Any, name: str, batch: int) -> Any:
        return _map(lambda t: self._copy(t, name, batch), x)

    def _copy(self, t: Tensor, name: str, batch: int) -> Tensor:
        size = t.numel() * t.element_size()
        if self.max_bytes is not None and self.nbytes + size > self.max_bytes:
            raise CaptureLimitError(
                f"capture would hold {self.nbytes + size} bytes, over max_bytes={self.max_bytes} (module {name!r}, "
                f"batch {batch}); capture fewer modules or batches, calls='first', inputs / outputs only, or "
                "raise max_bytes")
        self.nbytes += size
        t = t.detach()
        return t.clone() if self.offload is None else t.to(self.offload, copy=True)


def _resolve(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    if isinstance(names, str):
        raise TypeError(f"names is a list of module names, e.g. [{names!r}]; got a single string")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate module names in {list(names)}")
    if not names:
        raise ValueError("capture needs at least one module name")
    modules = {}
    for name in names:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            close = difflib.get_close_matches(name, [n for n, _ in model.named_modules()], n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"the model has no module named {name!r}{hint}") from None
    return modules


# --- capture ---------------------------------------------------------------------------------------------------


def capture(
    model: nn.Module,
    names: Sequence[str],
    batches: "Iterable[Any] | Calibration",
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    inputs: bool = True,
    outputs: bool = True,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    calls: Literal["all", "first"] = "all",
    early_stop: bool = False,
    offload: str | torch.device | None = "cpu",
    max_bytes: int | None = None,
    max_samples: int | None = None,
) -> dict[str, Captured]:
    """Run ``forward_fn(model, batch)`` for every batch and capture the named modules; returns name -> Captured.

    Args:
        model: the model; the names are ``model.get_submodule`` paths ("" is the model itself).
        names: modules to capture, each at most once.
        batches: calibration batches, read once, or a ``polyquant.nn.Calibration`` (its ``forward_fn`` is used).
        forward_fn: runs one batch; None uses ``polyquant.nn.default_forward`` (``model(batch)``; a tuple /
            list batch feeds its first element, a dict its items as keyword arguments).
        inputs / outputs: capture the modules' inputs / outputs.
        loss_fn: ``loss_fn(model_output, batch) -> scalar Tensor``; when given, each call also gets
            ``grad`` = d loss / d output (the output of ``forward_fn``, e.g. logits, is what ``loss_fn`` sees).
        calls: "all" records every call of a module (a module called twice per forward gives two calls per
            batch); "first" records its first call of each batch only.
        early_stop: end each forward as soon as every module's first call of the batch is captured (after the
            module, or before it runs when ``outputs=False``), so nothing later in the model runs. Needs
            ``calls="first"`` and no ``loss_fn``.
        offload: device the copies are stored on; None keeps each on the device it was computed on.
        max_bytes: bound on the stored bytes (inputs, outputs and gradients together); reaching it raises
            ``CaptureLimitError`` before the tensor that would exceed it is copied.
        max_samples: stop reading batches once every module holds at least this many samples
            (``Captured.num_samples``); whole batches are kept.

    Raises:
        ValueError: unknown / duplicate names, a named module not called during some batch, no batch at all,
            or inconsistent options.
        CaptureLimitError: ``max_bytes`` would be exceeded.
    """
    if calls not in ("all", "first"):
        raise ValueError(f"calls must be 'all' or 'first', got {calls!r}")
    if early_stop and (calls != "first" or loss_fn is not None):
        raise ValueError("early_stop needs calls='first' and no loss_fn (the gradient needs the whole forward)")
    if not (inputs or outputs or loss_fn is not None):
        raise ValueError("nothing to capture: inputs=False, outputs=False and no loss_fn")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples!r}")
    modules = _resolve(model, names)
    calib = calibration(batches, forward_fn)
    batches, forward_fn = calib.batches, calib.forward
    store = _Store(None if offload is None else torch.device(offload), max_bytes)
    result = {name: Captured(name) for name in modules}
    batch_index = -1
    entered: dict[str, int] = {}  # calls of each module begun in the current batch (recorded or not)
    returned: dict[str, int] = {}  # calls of each module finished in the current batch
    pending: dict[str, list[Call | None]] = {name: [] for name in modules}  # calls begun, not yet finished
    live: list[tuple[str, Call, Any]] = []  # (name, recorded call, the live output) for the gradients

    def all_in(counts: dict[str, int]) -> bool:
        return all(counts.get(n, 0) > 0 for n in modules)

    def make_pre_hook(name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            record = calls == "all" or entered.get(name, 0) == 0
            entered[name] = entered.get(name, 0) + 1
            call = None
            if record:
                call = Call(batch_index)
                if inputs:
                    call.args = store.copy(args, name, batch_index)
                    call.kwargs = store.copy(kwargs, name, batch_index)
                result[name].calls.append(call)
            pending[name].append(call)
            if early_stop and not outputs and all_in(entered):
                raise _StopForward

        return pre_hook

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            call = pending[name].pop()
            returned[name] = returned.get(name, 0) + 1
            if call is not None:
                if outputs:
                    call.output = store.copy(out, name, batch_index)
                if loss_fn is not None:
                    if any(_needs_grad(t) for t in tensors_in(out)):
                        out = _map(lambda t: t.detach().requires_grad_().clone() if _needs_grad(t) else t, out)
                    live.append((name, call, out))
            if early_stop and all_in(returned):
                raise _StopForward
            return out  # the output itself, or its copy that requires grad

        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(make_hook(name)))
        for batch_index, batch in enumerate(batches):
            entered.clear()
            returned.clear()
            live.clear()
            for stack in pending.values():
                stack.clear()
            with torch.set_grad_enabled(loss_fn is not None):
                try:
                    out = forward_fn(model, batch)
                except _StopForward:
                    pass
                else:
                    if loss_fn is not None:
                        _gradients(loss_fn(out, batch), live, store)
            missing = [n for n in modules if entered.get(n, 0) == 0]
            if missing:
                raise ValueError(f"module(s) {missing[:5]} not called by the forward pass of batch {batch_index}; "
                                 "check the names and forward_fn")
            if max_samples is not None and all(c.num_samples >= max_samples for c in result.values()):
                break
        if batch_index < 0:
            raise ValueError("the batch set is empty: capture needs at least one batch")
    finally:
        for h in handles:
            h.remove()
        live.clear()
    return result


def _gradients(loss: Tensor, live: list[tuple[str, Call, Any]], store: _Store) -> None:
    """Fill each live call's ``grad`` with d loss / d output (one ``torch.autograd.grad`` for the batch)."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar Tensor, got {type(loss).__name__}"
                         f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}")
    targets = [t for _, _, out in live for t in tensors_in(out) if t.requires_grad]
    grads: list[Tensor | None] = [None] * len(targets)
    if targets and loss.requires_grad:
        grads = list(torch.autograd.grad(loss, targets, allow_unused=True))
    # An output that does not reach the loss has a zero gradient.
    by_id = {id(t): torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)}
    for name, call, out in live:
        call.grad = _map(lambda t: store.copy(by_id[id(t)], name, call.batch) if id(t) in by_id else None, out)


@contextmanager
def replace_output(model: nn.Module, name: str, value: Any) -> Iterator[None]:
    """While active, the module ``name`` of ``model`` returns ``value`` in place of its own output.

    The module still runs (a forward hook swaps its result), so whatever follows it in the model computes from
    ``value``, and gradients flow from the model's output back into ``value``: a task loss of the whole model as
    a function of one block's output (LiDAR-PTQ's TGPL during block reconstruction). The hook is removed on exit,
    also when the forward raises.

        with replace_output(qmodel, "backbone.1", out_q):
            pred = qmodel(**batch)
    """
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module named {name!r}") from None
    handle = module.register_forward_hook(lambda _m, _args, _out: value)
    try:
        yield
    finally:
        handle.remove()
