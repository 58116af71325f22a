"""A run configuration from YAML: composition of profiles, `--set` overrides, one validation.

A run file (e.g. `configs/training.yaml`) names an adapter profile and a base-model profile,
and may name another run file it builds on (`run_profile`, e.g. `configs/quality.yaml` on
`demo.yaml`); those are merged under it, then `--set key.path=value` overrides are applied, then the result is
validated once. Every problem is reported at once, each with its key path and the file (or
override) that set the offending value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kwanzaa_adapter.config.sections import ConfigError, KwanzaaConfig

PROFILE_KEYS = ("run_profile", "adapter_profile", "model_profile")
# Keys of earlier versions and what took their place, named in the "unknown key" error.
REPLACED_KEYS = {
    "model.dtype": "model.precision",
    "quantization.compute_dtype": "model.precision",
    "training.bf16": "model.precision",
}

Origins = dict[tuple[str, ...], str]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError([f"{path}: YAML nests too deeply to be a config"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError([f"{path}: top level must be a mapping of sections, got {type(value).__name__}"])
    return value


def _merge(base: dict, top: dict, origins: Origins, source: str, prefix: tuple[str, ...] = ()) -> dict:
    """Deep-merge `top` over `base`, recording which source set each leaf."""
    merged = dict(base)
    for key, value in top.items():
        path = prefix + (str(key),)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, origins, source, path)
        else:
            merged[key] = value
            for old in [p for p in origins if p[: len(path)] == path]:
                del origins[old]
            origins[path] = source
    return merged


def _compose(path: Path, origins: Origins, stack: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError([f"{path}: profile includes itself: {chain}"])
    raw = _read_yaml(path)
    merged: dict = {}
    for key in PROFILE_KEYS:
        ref = raw.pop(key, None)
        if ref is None:
            continue
        if not isinstance(ref, str):
            raise ConfigError([f"{path}: {key}: must be a path to a YAML file"])
        merged = _merge(merged, _compose(path.parent / ref, origins, (*stack, path)), origins, str(path.parent / ref))
    return _merge(merged, raw, origins, _display(path))


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`a.b.c=value` -> (("a","b","c"), value) with the value read as YAML (numbers, bools, lists)."""
    key, sep, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts):
        raise ConfigError([f"--set {text}: expected key.path=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(tree: dict, parts: tuple[str, ...], value: Any, text: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"--set {text}: {'.'.join(parts[: i + 1])} is a value, not a section"])
        node = child
    node[parts[-1]] = value


def _format_errors(exc: ValidationError, origins: Origins) -> list[str]:
    problems = []
    for error in exc.errors():
        loc = tuple(str(p) for p in error["loc"])
        key = ".".join(loc)
        source = next((origins[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in origins), None)
        if error["type"] == "extra_forbidden":
            message = "unknown key" + (f" (replaced by {REPLACED_KEYS[key]})" if key in REPLACED_KEYS else "")
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = error["msg"].removeprefix("Value error, ")
            if "input" in error and not isinstance(error["input"], (dict, list)):
                message += f" (got {error['input']!r})"
        problems.append(f"{source + ': ' if source else ''}{key}: {message}")
    return problems


def load_training_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> KwanzaaConfig:
    """Load, compose, override and validate a run configuration; raises ConfigError with every problem."""
    origins: Origins = {}
    tree = _compose(Path(path), origins)
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(tree, parts, value, text)
        origins[parts] = f"--set {text}"
    try:
        return KwanzaaConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origins)) from None


def config_from_yaml_text(text: str, source: str = "<config>") -> KwanzaaConfig:
    """Read back a resolved config (e.g. an artifact's training_config.yaml)."""
    try:
        return KwanzaaConfig.model_validate(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None
    except ValidationError as exc:
        raise ConfigError([f"{source}: {p}" for p in _format_errors(exc, {})]) from None
