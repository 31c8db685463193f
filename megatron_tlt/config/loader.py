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

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from megatron_tlt.config.schema import Config
from megatron_tlt.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """An unknown key, a wrong type or an inconsistent value in a config."""


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        sub = f.type if dataclasses.is_dataclass(f.type) else type(default) if dataclasses.is_dataclass(default) else None
        if sub is not None:
            keys.extend(_valid_keys(sub, full + "."))
    return keys


def _explain(err: OmegaConfBaseException, schema: type) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or ""
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if isinstance(err, ConfigKeyError) and key:
        close = difflib.get_close_matches(str(key), _valid_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"unknown config key '{key}'{hint}")
    return ConfigError(f"bad value for config key '{key}': {msg}" if key else f"bad config: {msg}")


def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = (), schema: Type[T] = Config) -> T:
    """Merge schema defaults <- YAML file <- `key=value` overrides; return the typed dataclass."""
    base = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        layers.append(OmegaConf.load(p))
    overrides = list(overrides)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
    if overrides:
        layers.append(OmegaConf.from_dotlist(overrides))
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
