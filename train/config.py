"""Typed YAML configs.

A config file is a small delta on a base: it may name its base file with a
top-level `base:` key (a path relative to the file). OmegaConf merges the chain
onto a dataclass schema, then `key.sub=value` overrides from the command line.
Every dataclass in the schema validates itself in `__post_init__`, raising
ValueError whose message starts with the field name; `load_config` turns every
kind of bad input into one `ConfigError` naming the key and what is allowed,
before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from moe_playground.models.validate import check  # noqa: F401  (re-exported for config schemas)

T = TypeVar("T")


class ConfigError(ValueError):
    """Bad configuration: the message names the key and what is allowed."""


def read_yaml_mapping(path: Path, seen: tuple[Path, ...] = (), kind: str = "config") -> DictConfig:
    """The YAML mapping in `path` (resolved). ConfigError if `path` is already in `seen` (files that
    name each other in a cycle), missing, not YAML, not a mapping, or empty; `kind` names the file in messages."""
    if path in seen:
        raise ConfigError(f"{kind} files name each other in a cycle: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"{kind} file not found: {path}")
    try:
        layer = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in several types
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: a {kind} file must be a mapping of keys, got {type(layer).__name__}")
    if not layer:  # an empty file would silently mean "all defaults"
        raise ConfigError(f"{path}: the {kind} file is empty; give at least one key (a config may start "
                          "from another with `base: other.yaml`)")
    return layer


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The YAML layers of `path`, base first, without their `base:` keys."""
    path = path.resolve()
    layer = read_yaml_mapping(path, seen)
    base = layer.pop("base", None)
    chain = _read_chain(path.parent / base, seen + (path,)) if base else []
    return chain + [layer]


def _keys(schema: type, full_key: str) -> list[str]:
    """The keys allowed beside the last part of `full_key`."""
    node: Any = schema()
    for part in full_key.split(".")[:-1]:
        node = getattr(node, part, None)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _unknown_key_message(schema: type, full_key: str, where: str) -> str:
    allowed = _keys(schema, full_key)
    leaf = full_key.split(".")[-1]
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f" (did you mean '{'.'.join(full_key.split('.')[:-1] + close)}'?)" if close else ""
    return f"{where}: unknown key '{full_key}'{hint}. Allowed here: {', '.join(allowed)}"


def _first_line(e: OmegaConfBaseException) -> str:
    return str(e.msg).splitlines()[0]


def _merge(schema: type, cfg: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(schema, str(e.full_key), where)) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {e.full_key}: {_first_line(e)}") from None


def load_config(schema: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Load `path` (and its bases) onto `schema`, apply `overrides`, validate."""
    cfg = OmegaConf.structured(schema)
    for layer in _read_chain(Path(path)) if path is not None else []:
        cfg = _merge(schema, cfg, layer, str(path))
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        try:
            layer = OmegaConf.from_dotlist([item])
        except Exception as e:  # a value YAML cannot parse (yaml's errors come in several types)
            raise ConfigError(f"override '{item}': its value is not valid YAML ({' '.join(str(e).split())}); "
                              f"quote it, or write lists and mappings as in YAML, e.g. key=[1, 2] or key={{a: 1}}") from None
        cfg = _merge(schema, cfg, layer, f"override '{item}'")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key}: {_first_line(e)}") from None
    except ValueError as e:  # a __post_init__ check failed
        raise ConfigError(str(e)) from None


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, loadable again by `load_config`."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
