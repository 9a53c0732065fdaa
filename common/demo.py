"""The core demo: a small MLP trained on sklearn's 8x8 digits, quantized at W8A8 / W4A8 / W4A4 with min-max
and MSE observers. Prints accuracy and the bytes of the saved artifact for each setting.

Runs offline in a few seconds: ``polyquant demo`` (or ``python -m polyquant.demo``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .api import QuantizedModel
from .artifact import save
from .checkpoint import save_checkpoint
from .export import export
from .nn import QuantRule, QuantSpec, calibrate, prepare
from .primitives import PerChannel
from .progress import Progress, line_progress, progress_bar
from .report import text_table

__all__ = ["DemoRow", "checkpoint_bytes", "demo_bar", "demo_progress", "demo_threads", "digits_split",
           "median_seconds", "packed_copy", "run_core_demo", "text_table", "train_digits_mlp"]


@dataclass
class DemoRow:
    setting: str
    observer: str
    accuracy: float
    artifact_bytes: int


def digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn digits as float tensors in [0, 1]: (x_train, y_train, x_test, y_test), 1347 / 450 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1347], y[:1347], x[1347:], y[1347:]


def train_digits_mlp(x: Tensor, y: Tensor, *, seed: int = 0, epochs: int = 30) -> nn.Module:
    """A 64-128-128-10 MLP trained with Adam; about 97% test accuracy."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item() * 100


def _artifact_bytes(model: nn.Module, directory: Path, name: str) -> int:
    path = directory / f"{name}.safetensors"
    save(export(model, plugin=None, method="core-demo"), path)
    return path.stat().st_size


SETTINGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W3A3": (3, 3)}


@contextmanager
def demo_threads(most: int = 2) -> Iterator[None]:
    """Run a plugin demo on at most ``most`` torch threads (its tiny models are slower on more, and the demo's
    timings stay comparable between machines); the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, most))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _DemoBar:
    desc: str
    bars: bool
    lines: bool
    bar: Progress | None = None


_DEMO_BAR: ContextVar[_DemoBar | None] = ContextVar("polyquant_demo_bar", default=None)


@contextmanager
def demo_bar(desc: str, bars: bool, lines: bool = False) -> Iterator[None]:
    """Inside, ``demo_progress`` gives the demo running here one progress bar named ``desc`` (``bars``: drawn;
    else ``lines``: one line per step on standard error; else silent); it is closed on the way out. The methods
    the demo runs stay silent (they are called with ``progress=False``)."""
    state = _DemoBar(desc, bars, lines)
    token = _DEMO_BAR.set(state)
    try:
        yield
    finally:
        _DEMO_BAR.reset(token)
        if state.bar is not None:
            state.bar.close()


def demo_progress(total: int) -> Progress:
    """A plugin demo's progress: ``total`` steps, ``update(1, step=...)`` after each. Under ``polyquant demo``
    it is that plugin's one bar; called elsewhere (tests, Python) it is silent."""
    state = _DEMO_BAR.get()
    if state is None:
        return progress_bar(total=total, desc="demo", bars=False)
    if state.bar is not None:
        state.bar.close()
    with line_progress(state.lines):  # only this bar's lines: the methods inside run without progress
        state.bar = progress_bar(total=total, desc=state.desc, bars=state.bars)
    return state.bar


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """The median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (first-call
    allocations, lazy imports, kernel layout caches): the timing every demo and report shows."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def checkpoint_bytes(state: dict[str, Tensor], folder: str | Path, name: str) -> int:
    """The float side of a demo row: ``state`` saved as a safetensors checkpoint ``folder/name.safetensors``
    (``polyquant.checkpoint``, as the shipped models are); its size in bytes."""
    return save_checkpoint(state, Path(folder) / f"{name}.safetensors", {}).stat().st_size


def packed_copy(qm: QuantizedModel, folder: str | Path, name: str, model: nn.Module | None = None,
                cpu_dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, int]:
    """The real side of a demo row: ``qm`` saved to ``folder/name.safetensors`` and loaded back packed (codes
    and the kernels' GEMMs, ``polyquant.load(mode="packed")``; ``model``: the float skeleton when the plugin
    cannot build it from the recorded config). Returns the packed model and the artifact's size in bytes."""
    from .api import load, save as save_model

    path = save_model(qm, Path(folder) / f"{name}.safetensors")
    return load(path, model, mode="packed", cpu_dtype=cpu_dtype).model, path.stat().st_size


def run_core_demo(*, seed: int = 0, calib_samples: int = 256) -> str:
    """Train, quantize and report; returns the printable table."""
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = digits_split(seed)
    model = train_digits_mlp(x_train, y_train, seed=seed)
    calib = list(x_train[:calib_samples].split(64))
    rows: list[DemoRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = Path(tmp) / "float.safetensors"
        save_checkpoint(model.state_dict(), fp_path, {})
        rows.append(DemoRow("float32", "-", _accuracy(model, x_test, y_test), fp_path.stat().st_size))
        for setting, (wbits, abits) in SETTINGS.items():
            for observer in ("minmax", "mse"):
                rules = [QuantRule(
                    "*",
                    weight=QuantSpec(f"int{wbits}", PerChannel(0), observer=observer),
                    input=QuantSpec(f"int{abits}", observer=observer),
                )]
                qmodel = prepare(model, rules)
                calibrate(qmodel, calib, progress=False)
                rows.append(DemoRow(setting, observer, _accuracy(qmodel, x_test, y_test),
                                    _artifact_bytes(qmodel, Path(tmp), f"{setting}-{observer}")))
    elapsed = time.perf_counter() - start
    lines = [
        "polyquant core demo: 64-128-128-10 MLP on sklearn digits (450 test images), "
        f"calibration on {calib_samples} training images",
        f"{'setting':<8} {'observer':<8} {'accuracy %':>10} {'artifact bytes':>15}",
    ]
    lines += [f"{r.setting:<8} {r.observer:<8} {r.accuracy:>10.2f} {r.artifact_bytes:>15,}" for r in rows]
    lines.append(f"(weights per-channel symmetric INT, activations per-tensor INT; {elapsed:.1f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(run_core_demo())
