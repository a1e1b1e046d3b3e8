"""``--set key=value`` overrides on a :class:`~meanflow.config.schema.TrainConfig`: the dotted
keys, value conversion by the default's type, and one-line errors that name the closest key."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from ..errors import MeanFlowError, check


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of the (nested) dataclass ``cfg``."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += dotted_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(key: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` (a string from the command line or a JSON value) to type ``hint``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    target = args[0] if optional and args else hint
    if optional and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    ):
        return None
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if target is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            number = float(value)  # accepts "1e4"; "2.5" and "1.5e0" are refused below
            if not number.is_integer():
                raise ValueError
            return int(number)
        if target is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = {int: "an integer", float: "a number", bool: "true or false"}.get(target, "a text")
        raise MeanFlowError(f"{key} expects {kind}, got {value!r}") from None


def set_value(cfg: Any, key: str, value: Any) -> None:
    """Set dotted ``key`` (e.g. ``time.ratio``) on ``cfg``, converting ``value`` to its type."""
    parts = key.split(".")
    target = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(target)}
        if part not in names:
            full = ".".join(parts[: i + 1])
            raise MeanFlowError(
                f"unknown config key {key!r}{_suggest(full, dotted_keys(cfg))}; "
                "run 'meanflow train --help' for the list of keys"
            )
        if i < len(parts) - 1:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise MeanFlowError(f"config key {'.'.join(parts[: i + 1])!r} has no sub-keys")
    hints = typing.get_type_hints(type(target))
    if dataclasses.is_dataclass(getattr(target, parts[-1])):
        raise MeanFlowError(
            f"config key {key!r} is a group; set one of its keys, e.g. "
            f"{key}.{dataclasses.fields(getattr(target, parts[-1]))[0].name}"
        )
    setattr(target, parts[-1], _convert(key, value, hints[parts[-1]]))


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """``--set KEY=VALUE`` arguments as (key, value) pairs; an item written with a space
    instead of ``=`` (``"time.ratio 0.5"``) or missing its value is refused with the form to
    use."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            words = item.split()
            fix = (
                f"write --set {words[0]}={' '.join(words[1:])} (no space between the key and "
                "its value)"
                if len(words) > 1
                else f"write --set {words[0]}=VALUE (one argument, joined by '=')"
                if words
                else "write --set KEY=VALUE"
            )
            raise MeanFlowError(f"--set expects key=value, got {item!r}; {fix}")
        check(bool(key.strip()), f"--set expects key=value, got {item!r}; the key is missing")
        pairs.append((key.strip(), value.strip()))
    return pairs
