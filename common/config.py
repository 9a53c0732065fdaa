"""Method configs: one base class, declarative field checks, strict dict round trips, CLI flags from fields.

Every method of every plugin is configured by a dataclass that subclasses ``QuantConfig`` (in the spirit of
torchao's ``AOBaseConfig``). Fields hold what the method *is* (bits, search settings, seeds): they are saved in
artifacts and rebuilt by ``from_dict``. How a run is *displayed or placed* (progress bars, device) is never a
field: those are arguments of ``polyquant.quantize``.

    @dataclass
    class MyConfig(QuantConfig):
        '''My method.

        Args:
            wbits: weight bits.
            mode: how it searches.
        '''

        VERSION: ClassVar[int] = 1
        wbits: int = bits_field(4)
        mode: Literal["fast", "exact"] = "fast"

``__post_init__`` checks every field against its annotation (``int`` is not ``bool``; ``Literal`` choices;
``X | None``) and against the bounds given with ``int_field`` / ``float_field`` / ``bits_field``. ``to_dict``
writes ``{"version": VERSION, <field>: <value>, ...}``; ``from_dict`` accepts exactly those keys (an allowlist:
an unknown key or another version is a ``ConfigError``). ``cli_options`` lists the fields as command-line options
(``wbits`` -> ``--wbits``), with help taken from the class docstring's ``Args:`` section.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin

__all__ = [
    "QuantConfig",
    "ConfigError",
    "UsageError",
    "CliOption",
    "int_field",
    "float_field",
    "bits_field",
    "check_int",
    "cli_options",
    "field_help",
]

_BOUNDS = "polyquant.bounds"  # dataclass field metadata key: (lo, hi), inclusive; None = unbounded
_CLI = "polyquant.cli"  # dataclass field metadata key: extra option strings, e.g. ("--calib",)


class ConfigError(ValueError):
    """A config value or a config dict is invalid: the message names the config class and the field."""


class UsageError(ValueError):
    """A user's mistake found while running a method (a model the method cannot quantize, calibration data of the
    wrong kind): raised by handlers and plugin hooks with a one-line message; the command line prints it and
    exits with code 2, without a traceback."""


def int_field(default: int | None, lo: int | None = None, hi: int | None = None, *, cli: tuple[str, ...] = ()) -> Any:
    """A dataclass field holding an integer in [lo, hi] (either bound may be None)."""
    return field(default=default, metadata={_BOUNDS: (lo, hi), _CLI: cli})


def float_field(default: float | None, lo: float | None = None, hi: float | None = None, *,
                cli: tuple[str, ...] = ()) -> Any:
    """A dataclass field holding a real number in [lo, hi] (either bound may be None)."""
    return field(default=default, metadata={_BOUNDS: (lo, hi), _CLI: cli})


def bits_field(default: int | None, lo: int = 2, hi: int = 8) -> Any:
    """A dataclass field holding a bit width, 2..8 unless told otherwise."""
    return int_field(default, lo, hi)


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    """Raise ``ConfigError`` unless ``value`` is an int (not a bool) in [lo, hi]."""
    if not isinstance(value, int) or isinstance(value, bool) or not _within(value, lo, hi):
        raise ConfigError(f"{name} must be an integer{_range_text(lo, hi)}, got {value!r}")


def _within(value: float, lo: float | None, hi: float | None) -> bool:
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _range_text(lo: float | None, hi: float | None) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" >= {lo}"
    if lo is None:
        return f" <= {hi}"
    return f" in [{lo}, {hi}]"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(where: str, tp: Any, value: Any, bounds: tuple[Any, Any]) -> Any:
    """Check ``value`` against annotation ``tp``; returns the value (ints given for floats become floats)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(where, option, value, bounds)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{where} must be a sequence, got {value!r}")
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is None:
            if len(args) != len(value):
                raise ConfigError(f"{where} must have {len(args)} items, got {value!r}")
            return tuple(_check_value(f"{where}[{i}]", a, v, (None, None)) for i, (a, v) in enumerate(zip(args, value)))
        return tuple(_check_value(f"{where}[{i}]", item, v, (None, None)) for i, v in enumerate(value))
    lo, hi = bounds
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be True or False, got {value!r}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool) or not _within(value, lo, hi):
            raise ConfigError(f"{where} must be an integer{_range_text(lo, hi)}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not _within(value, lo, hi):
            raise ConfigError(f"{where} must be a number{_range_text(lo, hi)}, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported config field type {_type_name(tp)}")


@dataclass
class QuantConfig:
    """Base of every method config: validation in ``__post_init__``, a version, strict dict round trips."""

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{type(self).__name__}.{f.name}"
            value = _check_value(where, hints[f.name], getattr(self, f.name), f.metadata.get(_BOUNDS, (None, None)))
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields; raise ``ConfigError``. Subclasses override."""

    def to_dict(self) -> dict[str, Any]:
        """``{"version": VERSION, field: value, ...}``: JSON-ready (tuples become lists)."""
        out: dict[str, Any] = {"version": self.VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> QuantConfig:
        """Rebuild a config from ``to_dict`` output: only known keys, this version (``ConfigError`` otherwise)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} is read from a JSON object, got {type(data).__name__}")
        version = data.get("version", cls.VERSION)
        if version != cls.VERSION:
            raise ConfigError(f"{cls.__name__} version {version!r} is not readable by this build (it reads "
                              f"version {cls.VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"version"})
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}")
        try:
            return cls(**{k: v for k, v in data.items() if k != "version"})
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"{cls.__name__}: {e}") from None


# --- command line ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CliOption:
    """One command-line option generated from a config field."""

    field: str  # the dataclass field
    flags: tuple[str, ...]  # "--wbits", plus aliases
    kind: str  # "int" | "float" | "str" | "bool" | "choice"
    default: Any
    optional: bool  # the field accepts None ("none" on the command line)
    choices: tuple[Any, ...] = ()
    bounds: tuple[Any, Any] = (None, None)
    help: str = ""


def field_help(cls: type) -> dict[str, str]:
    """Field name -> description, parsed from the ``Args:`` sections of the docstrings of ``cls`` and its bases.

    An entry is ``name: text`` (or ``a, b: text``) at the section's first indentation; deeper lines continue it.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__doc__" in vars(klass):
            out.update(_args_section(klass.__doc__ or ""))
    return out


def _args_section(doc: str) -> dict[str, str]:
    _, _, section = doc.partition("Args:")
    out: dict[str, str] = {}
    indent: int | None = None
    names: list[str] = []
    for line in section.splitlines():
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        m = re.match(r"([A-Za-z_]\w*(?:,\s*[A-Za-z_]\w*)*):\s*(.*)", line.strip())
        if depth < indent:
            break
        if depth == indent and m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2).strip()
        elif depth > indent:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
    return out


def cli_options(cls: type[QuantConfig]) -> list[CliOption]:
    """The command-line options of a config class, one per field."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    options = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        optional = False
        if get_origin(tp) in (typing.Union, types.UnionType):
            inner = [a for a in get_args(tp) if a is not type(None)]
            optional = len(inner) < len(get_args(tp))
            tp = inner[0] if len(inner) == 1 else tp
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        flags = ("--" + f.name.replace("_", "-"), *f.metadata.get(_CLI, ()))
        bounds = f.metadata.get(_BOUNDS, (None, None))
        if get_origin(tp) is Literal:
            kind, choices = "choice", get_args(tp)
        elif tp in (bool, int, float, str):
            kind, choices = tp.__name__, ()
        else:
            continue  # tuples and other structured fields are Python-API only
        options.append(CliOption(f.name, flags, kind, default, optional, tuple(choices), bounds, helps.get(f.name, "")))
    return options
