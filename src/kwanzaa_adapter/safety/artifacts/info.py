"""The `info` command's table: metadata and metrics, nested keys flattened to dotted paths."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{path}.")
        else:
            yield path, value


def _render(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value.replace("\n", "\\n")
    if value is None:
        return "-"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def format_info_table(metadata: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """A two-column key/value table, a section each for metadata and metrics."""
    sections = {"metadata": list(flatten(metadata)), "metrics": list(flatten(metrics))}
    width = max([len("key"), *(len(k) for rows in sections.values() for k, _ in rows)])
    lines = [f"{'key':<{width}}  value", f"{'-' * width}  {'-' * 5}"]
    for title, rows in sections.items():
        lines.append(f"[{title}]")
        lines += [f"{key:<{width}}  {_render(value)}" for key, value in rows] or [f"{'(none)':<{width}}"]
    return "\n".join(line.rstrip() for line in lines)
