"""Load a `Config` from YAML presets and `a.b=value` overrides, strictly.

An unknown key or a value of the wrong type is a `ConfigError` that names the full key and,
for unknown keys, the closest valid one.

    cfg = load_config("examples/configs/tiny.yaml", ["model.num_layers=4"])
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Iterable, Optional, Type, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from megatron_tlt.config.schema import Config
from megatron_tlt.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """An unknown key, a wrong type or an inconsistent value in a config."""


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of the schema, dotted; the fields of list items (reward.fns) as 'reward.fns[].name'."""
    keys = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            keys.extend(_valid_keys(type(default[0]), full + "[]."))
            continue
        sub = f.type if dataclasses.is_dataclass(f.type) else type(default) if dataclasses.is_dataclass(default) else None
        if sub is not None:
            keys.extend(_valid_keys(sub, full + "."))
    return keys


def _closest_key(key: str, valid: list[str]) -> Optional[str]:
    """The valid key closest to `key`; a key inside a list item comes without its path, so it is matched
    against the last part of each valid key."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return close[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(valid)}
    close = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.5)
    return leaves[close[0]] if close else None


def _explain(err: OmegaConfBaseException, schema: type) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or ""
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if isinstance(err, ConfigKeyError) and key:
        close = _closest_key(str(key), _valid_keys(schema))
        hint = f"; did you mean '{close}'?" if close else ""
        return ConfigError(f"unknown config key '{key}'{hint}")
    return ConfigError(f"bad value for config key '{key}': {msg}" if key else f"bad config: {msg}")


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return str(problem)


def _load_yaml(p: Path):
    """The YAML mapping in `p`; ConfigError naming `file:line` for malformed YAML, bad bytes or a non-mapping."""
    try:
        data = OmegaConf.load(p)
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: malformed YAML ({_yaml_problem(e)})") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{p}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{p}: expected a YAML mapping of config keys, got a list")
    return data


def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = (), schema: Type[T] = Config) -> T:
    """Merge schema defaults <- YAML file <- `key=value` overrides; return the typed dataclass."""
    base = OmegaConf.structured(schema)
    for key in ("head_dim", "model.head_dim"):  # derived at load from the merged sizes unless set (the default's is derived)
        if OmegaConf.select(base, key, default="absent") != "absent":
            OmegaConf.update(base, key, None)
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        layers.append(_load_yaml(p))
    overrides = list(overrides)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
        try:
            layers.append(OmegaConf.from_dotlist([o]))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {o!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {o!r}: {str(e).splitlines()[0]}") from None
    try:
        # '???' must be checked before merging into the schema, where it turns into None for Optional fields.
        missing = sorted(OmegaConf.missing_keys(OmegaConf.merge(*layers))) if layers else []
        if missing:
            raise ConfigError(f"config values left as '???' must be set: {', '.join(missing)} (e.g. {missing[0]}=...)")
        merged = OmegaConf.merge(base, *layers)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, schema) from None
    except ValueError as e:  # cross-field checks in the dataclasses' __post_init__
        raise ConfigError(str(e)) from None
    return obj


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
