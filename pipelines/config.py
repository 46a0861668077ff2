"""Typed configs: frozen dataclasses loaded from YAML plus dotted overrides (`generation.temperature=0.7`).

Each component owns its dataclass next to its consumer (GenerationConfig in pipelines/generate.py, ...); this
module only knows how to build any of them from plain data and to reject bad keys and values with a message
that names them. Field help text lives in `field(metadata={"help": ...})`, shown by `describe()`.

Why not OmegaConf/Hydra: a hundred lines give us strict typing of frozen dataclasses with error messages that
name the dotted key, and one dependency fewer; Hydra's CLI and working-directory changes fight Ray jobs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the dotted key.

    The user-error class of the CLI: `pipelines.runtime.cli_main` prints it as one line and exits 2.
    """


class InputError(ConfigError):
    """A user's input that cannot be used (a path of the wrong kind, a file that is not what its name says, rows of
    another schema, a folder that is not a model); the message names the input and says what to do."""


class MissingInput(InputError, FileNotFoundError):
    """An input path that does not exist (also a FileNotFoundError, for callers that catch that)."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        # a key one level too high (a flat `max_model_len` where it lives in `engine:`, as in older configs):
        # name the section that takes it
        homes = [f"{prefix}{name}.{unknown[0]}" for name in sorted(fields) if dataclasses.is_dataclass(hints[name])
                 and unknown[0] in {f.name for f in dataclasses.fields(hints[name])}]
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; {cls.__name__} takes: {', '.join(sorted(fields))}"
            + (f"; did you mean {' or '.join(homes)}?" if homes else "")
        )
    kwargs = {}
    for name, value in data.items():
        tp, f = hints[name], fields[name]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) and "=" in v for v in value):
                value = parse_overrides(list(value))  # a section given as dotted overrides: [a.b=1, c=2]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(value, dict) and dataclasses.is_dataclass(default) and not isinstance(default, type):
                # a partial section keeps the rest of the field's own default, not the section class's defaults
                value = _merge(dataclasses.asdict(default), value)
        kwargs[name] = _coerce(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars."""
    data: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. generation.temperature=0.7")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r}: empty key")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return data


def _section(v: Any) -> Any:
    """A section given as a list of dotted overrides ([a.b=1, c=2]) as a mapping; anything else as it is."""
    if isinstance(v, list) and v and all(isinstance(x, str) and "=" in x for x in v):
        return parse_overrides(v)
    return v


def _merge(base: dict, extra: dict) -> dict:
    """Deep merge, later wins. A section written as a list of dotted overrides merges like a mapping, so that
    `annotate.labels=x` on the command line changes one key of a YAML's `annotate: [rollouts=2, ...]`."""
    out = dict(base)
    for k, v in extra.items():
        a, b = _section(out.get(k)), _section(v)
        if isinstance(b, dict) and isinstance(a, dict):
            out[k] = _merge(a, b)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Build `cls` from `base` (a dict), then the YAML file at `path`, then dotted `overrides`, in that order."""
    data: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} {'is a folder' if p.is_dir() else 'does not exist'}; give a YAML "
                              f"file (see configs/)")
        try:
            loaded = yaml.safe_load(p.read_bytes()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: not YAML ({' '.join(str(e).split())})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
        data = _merge(data, loaded)
    for item in overrides or ():  # one at a time, so "s.a=1" then "s=[b=2]" keeps both
        data = _merge(data, parse_overrides([item]))
    return _build(cls, data)


def to_dict(cfg: Any) -> dict:
    """A config as plain data (for snapshots next to outputs and MLflow params)."""
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe(cls: type) -> str:
    """One line per field: dotted name, type, default and help text (for --help of a job)."""
    lines = []
    hints = typing.get_type_hints(cls)

    def walk(c: type, prefix: str) -> None:
        h = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            tp = h[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            lines.append(f"  {prefix}{f.name} = {default!r}  {f.metadata.get('help', '')}")

    del hints
    walk(cls, "")
    return "\n".join(lines)


def help_field(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """`field()` with help text; mutable defaults go through default_factory."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)
