"""kwanzaa-adapter: verified QLoRA adapters for citation-grounded RAG chat.

The public face: `train_adapter` (the eight steps), `load_training_config`, `create_model` (a backend
model over a verified adapter) and `verify_artifact`. They load on first use (`__version__` too),
so `import kwanzaa_adapter` stays light; no module inside the package imports this one.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "train_adapter": "kwanzaa_adapter.training.workflow",
    "load_training_config": "kwanzaa_adapter.config",
    "create_model": "kwanzaa_adapter.backend.models",
    "verify_artifact": "kwanzaa_adapter.safety.artifacts",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import version

        return version("kwanzaa-adapter")
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kwanzaa_adapter' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
