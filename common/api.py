"""The method contract: ``quantize(model, config, calib=...)``, ``save`` and ``load``, keyed by config type.

    import polyquant as pq
    from polyquant.plugins.vit.adalog import AdaLogConfig

    qm = pq.quantize(model, AdaLogConfig(wbits=4, abits=4), calib=batches)    # -> QuantizedModel
    pq.save(qm, "adalog.safetensors")                                          # artifact: safetensors + JSON
    qm2 = pq.load("adalog.safetensors")                                        # plugin rebuilds the model
    qm3 = pq.load("adalog.safetensors", mode="packed")                         # ... on packed codes + kernels

A plugin registers one handler per config class (torchao's ``quantize_`` does the same with its configs):

    @register_handler(AdaLogConfig, plugin="vit", method="adalog", export=..., restore=..., packed_weights=...)
    def _quantize(model: nn.Module, config: AdaLogConfig, calib: Calibration, run: RunOptions) -> QuantizedModel:
        ...

``calib`` means one thing everywhere: an iterable of batches, each fed to the model by ``forward_fn(model,
batch)`` (default: a tensor is ``model(batch)``, a dict ``model(**batch)``, a tuple or list ``model(batch[0])``),
held together as a ``Calibration`` (``polyquant.nn``) that ``calibrate`` and ``capture`` take whole. Progress bars
and the device are arguments of the call (``RunOptions``), never config fields, never saved. ``quantize`` copies
the model and places it and the batches on the device once, before the handler runs. A handler reports a user's
mistake by raising ``UsageError`` (the command line: one line, exit code 2).

Artifacts (``polyquant.artifact``) written by ``save`` carry in their manifest ``config``:

    schema       ARTIFACT_SCHEMA (1)
    model        the plugin's model config (its ``build_model`` rebuilds the float skeleton from it), or null
    method       the method config, ``config.to_dict()`` (version + fields)
    state        JSON the method needs beyond the config (searched choices)
    entries      each quantized weight's typed entry (``polyquant.entries``: int, float, table, vq, rotated)
    quantizers   every quantizer's spec; layers: every core quant layer (``polyquant.nn.layer_specs``)

and tensors named by the handler's ``export`` (``polyquant.export``). ``load`` reads the plugin and method from the
manifest, resolves them through the plugin's ``METHODS`` (never by importing a name read from the file), checks the
method config against its class, asks the plugin's ``build_model`` for the skeleton (or uses the ``model`` given)
and hands both to the handler's ``restore`` (default: the plugin's ``prepare`` hook or the recorded layers, then
the entries and qparams).

``load(path, mode="packed")`` then replaces the quantized layers by packed modules (``polyquant.packed``) built
from the manifest's weight entries (or the handler's ``packed_weights(qm, artifact)``).
"""

from __future__ import annotations

import copy
import os
import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from .artifact import Artifact, ArtifactError
from .config import ConfigError, QuantConfig, UsageError
from .nn import HALF_DTYPES, Calibration, calibration, cast_floats, default_forward, half_dtype, tensors_in, to_device

__all__ = [
    "ARTIFACT_SCHEMA",
    "Calibration",
    "UsageError",
    "RunOptions",
    "QuantizedModel",
    "MethodExample",
    "describe_model",
    "model_description",
    "Handler",
    "register_handler",
    "get_handler",
    "handlers",
    "quantize",
    "save",
    "load",
    "to_artifact",
    "from_artifact",
    "check_restored",
    "default_forward",
    "progress_default",
]

ARTIFACT_SCHEMA = 1

C = TypeVar("C", bound=QuantConfig)
ForwardFn = Callable[[nn.Module, Any], Any]


def progress_default() -> bool:
    """Progress bars are on when standard error is a terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


@dataclass(frozen=True)
class RunOptions:
    """How a run is displayed and placed: call arguments, never saved."""

    progress: bool = False
    device: torch.device | None = None


@dataclass
class QuantizedModel:
    """What ``quantize`` returns and ``load`` rebuilds.

    Args:
        model: the quantized model (eval mode).
        config: the method config it was quantized with.
        state: JSON-ready data that the method's ``restore`` needs beyond the config (searched choices, specs).
        report: the method's report of the run (not saved).
        plugin, method: where the method lives (``plugin/method`` on the command line); filled in from the
            handler's registration.
        model_config: the plugin's description of the float architecture (its ``build_model`` input), or None
            when the model is the user's own (``load`` then needs the float model passed as ``model``). Filled in
            from ``describe_model`` when the plugin built the float model.
    """

    model: nn.Module
    config: QuantConfig
    state: dict[str, Any] = field(default_factory=dict)
    report: Any = None
    plugin: str | None = None
    method: str = ""
    model_config: dict[str, Any] | None = None
    packing: Any = None  # polyquant.packed.PackReport after load(mode="packed"), else None

    def __call__(self, x: Any) -> Any:
        return self.model(x)


_MODEL_CONFIGS: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def describe_model(model: nn.Module, model_config: dict[str, Any]) -> nn.Module:
    """Record how a plugin's ``build_model`` can rebuild ``model`` (kept beside the model, not on it); returns it.

    ``quantize`` copies the description into the ``QuantizedModel``, so that ``save`` can record it.
    """
    _MODEL_CONFIGS[model] = copy.deepcopy(model_config)
    return model


def model_description(model: nn.Module) -> dict[str, Any] | None:
    """The description ``describe_model`` recorded for ``model``, or None."""
    found = _MODEL_CONFIGS.get(model)
    return None if found is None else copy.deepcopy(found)


@dataclass
class MethodExample:
    """A small, fast, offline case of one method, which a plugin's impl module returns from ``example(method)``:
    the contract test (``tests/test_contract.py``) runs every method of every plugin through it, also compiled
    (``torch.compile(packed model, fullgraph=True)``, or with graph breaks where ``graph_breaks`` says why)."""

    model: nn.Module
    config: QuantConfig
    calib: list[Any]
    inputs: Any  # what the model is called on to compare outputs
    graph_breaks: str | None = None  # why the packed model cannot compile as one graph (None: it can)


ExportFn = Callable[[QuantizedModel], dict[str, Any]]  # key -> Tensor, or module name -> polyquant.entries.Entry
RestoreFn = Callable[[nn.Module, Any, Artifact], QuantizedModel]
PrepareFn = Callable[[nn.Module, Any, dict[str, Any]], nn.Module]  # (float skeleton, config, state) -> quant layers
PackedWeightsFn = Callable[[QuantizedModel, Artifact], dict[str, Any]]  # name -> Entry, or why not packed
QuantizeFn = Callable[[nn.Module, Any, Calibration, RunOptions], QuantizedModel]
ExampleFn = Callable[[nn.Module, dict[str, Any]], Any]  # (restored model, state) -> one input batch for it


def _core_export(qm: QuantizedModel) -> dict[str, Any]:
    from .export import export_model

    return export_model(qm.model)


def _core_packed_weights(qm: QuantizedModel, art: Artifact) -> dict[str, Any]:
    from .export import weight_entries

    return weight_entries(qm.model, art)


@dataclass(frozen=True)
class Handler(Generic[C]):
    """What a plugin registers for one config class (see ``register_handler``)."""

    config_cls: type[C]
    plugin: str | None
    method: str
    quantize: QuantizeFn
    export: ExportFn
    restore: RestoreFn
    packed_weights: PackedWeightsFn
    prepare: PrepareFn | None = None
    copy_model: bool = True
    example_input: ExampleFn | None = None


_HANDLERS: dict[type[QuantConfig], Handler[Any]] = {}


def register_handler(
    config_cls: type[C],
    *,
    plugin: str | None,
    method: str,
    export: ExportFn | None = None,
    restore: RestoreFn | None = None,
    prepare: PrepareFn | None = None,
    packed_weights: PackedWeightsFn | None = None,
    copy_model: bool = True,
    example_input: ExampleFn | None = None,
) -> Callable[[QuantizeFn], QuantizeFn]:
    """Decorator: register ``fn(model, config, calib, run) -> QuantizedModel`` as the handler of ``config_cls``.

    ``quantize`` calls ``fn`` with a copy of the user's model (``copy_model=False``: the model itself, for methods
    that only read it) already on ``run.device``, and a ``Calibration`` whose batches arrive on that device with
    the user's ``forward_fn``; ``fn`` may change the model it gets in place.

    The artifact side has defaults, so a method of core quant layers (``polyquant.nn``) writes none of it:

    ``export(qm) -> {key: Tensor, or module name: Entry}``: the artifact's tensors and typed weight entries
        (``polyquant.entries``); default ``polyquant.export.export_model``.
    ``prepare(skeleton, config, state) -> model``: puts the method's quant layers on the float skeleton (the
        plugin's prepare rules); the default restore then loads the artifact into it. Without ``prepare`` the
        default restore rebuilds the core quant layers the manifest records (``polyquant.nn.prepare_from_specs``).
    ``restore(skeleton, config, artifact) -> QuantizedModel``: the whole rebuild, for methods whose model is not
        made of quant layers (default: prepare, then ``polyquant.export.restore``).
    ``packed_weights(qm, artifact) -> {module name: Entry, or the reason it stays fake-quant}``: what
        ``load(mode="packed")`` packs; default: the manifest's entries (``polyquant.export.weight_entries``).
    ``example_input(model, state) -> batch``: one small input of the restored model (e.g. zeros of the recorded
        input size); ``load`` runs the model on it once (``check_restored``), so that an artifact whose tensors do
        not fit together fails at load with an ``ArtifactError`` naming the module, not at the user's first call.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, QuantConfig)):
        raise TypeError(f"handlers are registered for QuantConfig subclasses, got {config_cls!r}")

    def decorate(fn: QuantizeFn) -> QuantizeFn:
        old = _HANDLERS.get(config_cls)
        if old is not None and old.quantize is not fn:
            raise ValueError(f"{config_cls.__name__} already has a handler ({old.plugin}/{old.method})")
        _HANDLERS[config_cls] = Handler(config_cls, plugin, method, fn, export or _core_export,
                                        restore or partial(_default_restore, prepare),
                                        packed_weights or _core_packed_weights, prepare, copy_model,
                                        example_input)
        return fn

    return decorate


def _default_restore(prepare: PrepareFn | None, model: nn.Module, config: QuantConfig, art: Artifact) -> QuantizedModel:
    """The restore of a method of quant layers: the plugin's ``prepare`` (or the recorded core layers), then the
    artifact's entries, qparams and float tensors (``polyquant.export.restore``)."""
    from .export import restore
    from .nn import prepare_from_specs

    state = art.config.get("state")
    state = state if isinstance(state, dict) else {}
    if prepare is not None:
        model = prepare(model, config, state)
    else:
        layers = art.config.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise ArtifactError(f"{art.plugin}/{art.method}: the artifact records no quant layers and the method has "
                                "no prepare hook to rebuild them")
        try:
            model = prepare_from_specs(model, layers)
        except ValueError as e:
            raise ArtifactError(f"the artifact's layers do not fit the model: {e}") from None
    return QuantizedModel(restore(model, art).eval(), config, state=dict(state))


def _load_owner_plugin(config_cls: type[QuantConfig]) -> None:
    """Load the discovered plugin whose package defines ``config_cls`` (its impl module registers the handlers),
    so that ``quantize(model, SomeConfig())`` works after importing only the config's module."""
    from .plugins import discover, load as load_plugin

    module = config_cls.__module__
    for name, info in discover().items():
        if not info.available or info.spec is None:
            continue
        # the packages of the plugin's spec and impl modules: "pkg.spec:SPEC" -> "pkg"; "pkg:SPEC" -> "pkg"
        roots = {_package(info.value.partition(":")[0]), _package(info.spec.impl)}
        if any(module == root or module.startswith(root + ".") for root in roots if root):
            load_plugin(name)
            return


def _package(dotted: str) -> str:
    """The package a module belongs to: itself for a top-level module, else its parent."""
    head, dot, _ = dotted.rpartition(".")
    return head if dot else dotted


def get_handler(config_cls: type[QuantConfig]) -> Handler[Any]:
    """The handler registered for ``config_cls``, loading the plugin that defines the class if needed
    (``LookupError`` if none)."""
    handler = _HANDLERS.get(config_cls)
    if handler is None:
        _load_owner_plugin(config_cls)
        handler = _HANDLERS.get(config_cls)
    if handler is None:
        raise LookupError(f"no quantize handler is registered for {config_cls.__name__}; import the plugin module "
                          "that defines it (or use polyquant.plugins.get_method)")
    return handler


def handlers() -> dict[type[QuantConfig], Handler[Any]]:
    """Every registered handler, by config class (a copy)."""
    return dict(_HANDLERS)


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib: Iterable[Any] | Calibration,
    forward_fn: ForwardFn | None = None,
    *,
    progress: bool | None = None,
    device: str | torch.device | None = None,
) -> QuantizedModel:
    """Quantize a copy of ``model`` with the method ``config`` configures; ``calib`` is an iterable of batches
    (or a ``Calibration``), fed by ``forward_fn``.

    ``progress``: None shows bars when standard error is a terminal. ``device``: where to run (None: where the
    model is); the model copy and every batch are moved there before the method runs. The input model is not
    modified.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig instance (e.g. AdaLogConfig()), got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    handler = get_handler(type(config))
    run = RunOptions(progress=progress_default() if progress is None else bool(progress),
                     device=None if device is None else torch.device(device))
    half = half_dtype(model)  # a float16 / bfloat16 model is quantized in float32 and given back in its dtype
    calibration_ = calibration(calib, forward_fn).to(run.device, dtype=None if half is None else torch.float32)
    work = copy.deepcopy(model) if handler.copy_model or half is not None else model
    if run.device is not None:
        work = work.to(run.device)
    if half is not None:
        work = work.float()
    qm = handler.quantize(work, config, calibration_, run)
    if not isinstance(qm, QuantizedModel):
        raise TypeError(f"the handler of {type(config).__name__} returned {type(qm).__name__}, not a QuantizedModel")
    if half is not None:
        cast_floats(qm.model, half)
        qm.state = {**qm.state, "dtype": str(half).removeprefix("torch.")}
    qm.plugin, qm.method = handler.plugin, handler.method
    if qm.model_config is None:
        qm.model_config = model_description(model)
    return qm


# --- artifacts -------------------------------------------------------------------------------------------------


def to_artifact(qm: QuantizedModel, meta: dict[str, Any] | None = None) -> Artifact:
    """The artifact of a quantized model (tensors from its handler's ``export``; manifest as the module says)."""
    from .export import manifest_sections, split_export

    handler = get_handler(type(qm.config))
    tensors, entries = split_export(handler.export(qm))
    return Artifact(
        tensors=tensors,
        plugin=qm.plugin,
        method=qm.method,
        config={"schema": ARTIFACT_SCHEMA, "model": copy.deepcopy(qm.model_config), "method": qm.config.to_dict(),
                "state": copy.deepcopy(qm.state), **manifest_sections(qm.model, entries)},  # the artifact's own
        meta=dict(meta or {}),
    )


def save(qm: QuantizedModel, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
    """Write ``qm`` as an artifact (atomic; see ``polyquant.artifact``); ``meta`` is free-form JSON.

    An existing regular file at ``path`` is replaced; a target that is not one (a directory, device, FIFO or
    symbolic link) or cannot be written is refused with ``ArtifactError`` before the model is exported.
    """
    from . import artifact

    if not isinstance(qm, QuantizedModel):
        raise TypeError(f"polyquant.save takes a QuantizedModel (from polyquant.quantize), got {type(qm).__name__}")
    artifact.check_target(path, force=True)
    return artifact.save(to_artifact(qm, meta), path)


def _handler_for(art: Artifact) -> tuple[Handler[Any], Any]:
    """The handler and the impl module (or None for the core) named by an artifact."""
    if art.plugin is None:
        raise ArtifactError("the artifact names no plugin; restore it with polyquant.export.restore(model, artifact)")
    from .plugins import get_method, load as load_plugin

    cls = get_method(art.plugin, str(art.method))
    if not (isinstance(cls, type) and issubclass(cls, QuantConfig)):
        raise ArtifactError(f"{art.plugin}/{art.method} is not a config class in the plugin's METHODS")
    return get_handler(cls), load_plugin(art.plugin)


LOAD_MODES = ("fake", "packed")


def from_artifact(
    art: Artifact, model: nn.Module | None = None, *, mode: str = "fake", device: str | torch.device | None = None,
    cpu_dtype: torch.dtype = torch.bfloat16,
) -> QuantizedModel:
    """Rebuild the quantized model an artifact describes (see ``load``)."""
    if mode not in LOAD_MODES:
        raise ValueError(f"mode must be one of {', '.join(LOAD_MODES)}, got {mode!r}")
    cfg = art.config
    if cfg.get("schema") != ARTIFACT_SCHEMA:
        raise ArtifactError(f"artifact schema {cfg.get('schema')!r} is not readable by this build "
                            f"(it reads schema {ARTIFACT_SCHEMA})")
    handler, impl = _handler_for(art)
    try:
        config = handler.config_cls.from_dict(cfg.get("method"))
    except ConfigError as e:
        raise ArtifactError(f"the artifact's method config is invalid: {e}") from None
    if model is None:
        model_config = cfg.get("model")
        build = getattr(impl, "build_model", None)
        if model_config is None or build is None:
            raise ArtifactError(f"{art.plugin}/{art.method}: the artifact does not describe its model; pass the "
                                "float model as load(path, model=...)")
        try:
            _check_model_fits(build, model_config, art)
            model = build(model_config)
        except (ValueError, TypeError, KeyError) as e:
            raise ArtifactError(f"the artifact's model config is invalid: {e}") from None
    else:
        model = copy.deepcopy(model)
        if half_dtype(model) is not None:
            model = model.float()  # restored in float32, then cast to the recorded dtype (as quantize does)
    qm = handler.restore(model, config, art)
    half = _recorded_dtype(qm.state)
    if half is not None:
        cast_floats(qm.model, half)
    qm.plugin, qm.method = handler.plugin, handler.method
    qm.model_config = cfg.get("model")
    dev = torch.device("cpu") if device is None else torch.device(device)
    qm.model.to(dev)
    if mode == "packed":
        from .packed import pack_model

        qm.packing = pack_model(qm.model, handler.packed_weights(qm, art), device=dev, cpu_dtype=cpu_dtype)
    if handler.example_input is not None:
        check_restored(qm.model, to_device(handler.example_input(qm.model, qm.state), dev, dtype=half))
    return qm


def _recorded_dtype(state: dict[str, Any]) -> torch.dtype | None:
    """The half-precision dtype ``quantize`` recorded for a float16 / bfloat16 model (None: float32)."""
    name = state.get("dtype")
    if name is None:
        return None
    found = [d for d in HALF_DTYPES if str(d) == f"torch.{name}"]
    if not found:
        raise ArtifactError(f"the artifact's state.dtype must be float16 or bfloat16, got {name!r:.40}")
    return found[0]


MAX_PARAMETERS_PER_BYTE = 64  # a model may hold at most this many parameters per byte its artifact stores


def _check_model_fits(build: Callable[[Any], nn.Module], model_config: Any, art: Artifact) -> None:
    """Refuse, before building it, a model config whose model has far more parameters than the artifact stores
    (a forged config would otherwise allocate gigabytes before the first shape check): the skeleton is built on
    the meta device (no memory) and may hold ``MAX_PARAMETERS_PER_BYTE`` parameters per stored byte (1/8 bit per
    weight, below any codebook's rate). A builder that cannot run on the meta device skips the check."""
    try:
        with torch.device("meta"):
            skeleton = build(model_config)
    except (RuntimeError, NotImplementedError, OSError, AttributeError):
        return  # not buildable on the meta device: the plugin's own bounds apply
    n = sum(p.numel() for p in skeleton.parameters())
    stored = sum(t.numel() * t.element_size() for t in art.tensors.values())
    if n > MAX_PARAMETERS_PER_BYTE * stored + 1_000_000:
        raise ArtifactError(f"a model of {n:,} parameters, more than the artifact's {stored:,} stored bytes can hold")


def check_restored(model: nn.Module, example: Any) -> None:
    """Run a restored ``model`` once on ``example`` (``default_forward``, no grad): ``ArtifactError`` naming the
    innermost module that raised, or the outputs that are not finite. A forged artifact whose tensors each pass
    their own checks but not together (a per-channel scale of another width) fails here, at load."""
    running: list[str] = []  # the modules entered and not yet left: the last one raised

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            running.append(name)
        return hook

    def leave(*_: Any) -> None:
        running.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name or type(module).__name__)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad():
            out = default_forward(model, example)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        where = running[-1] if running else type(model).__name__
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ArtifactError(f"the restored model does not run: {where}: {type(e).__name__}: {first}") from None
    finally:
        for h in handles:
            h.remove()
    bad = [t for t in tensors_in(out) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ArtifactError("the restored model's outputs on a zero input are NaN or Inf: a stored value is out of "
                            "range")



def load(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, mode: str = "fake",
    device: str | torch.device | None = None, cpu_dtype: torch.dtype = torch.bfloat16,
) -> QuantizedModel:
    """Load an artifact and rebuild its quantized model: the plugin's ``build_model`` makes the float skeleton
    from the recorded model config (or ``model`` is used, not modified), then the method's ``restore``.
    ``path`` must be a regular file (see ``polyquant.artifact.load``: ``ArtifactError`` for anything else).

    ``mode="fake"``: fake-quant modules (float weights on the quantization grid). ``mode="packed"``: the
    quantized layers become packed modules (``polyquant.packed``: codes only, the kernels' GEMMs); the load
    report is ``qm.packing``. ``device``: where the model runs (default CPU); packed layouts are built for it.
    ``cpu_dtype``: compute dtype of the packed CPU int4 / int8 weight-only GEMMs (``torch.bfloat16``, the default,
    is fast; ``torch.float32`` matches fake-quant to fp32 rounding but is slow; see ``polyquant.packed``).
    """
    from . import artifact

    return from_artifact(artifact.load(path), model, mode=mode, device=device, cpu_dtype=cpu_dtype)
