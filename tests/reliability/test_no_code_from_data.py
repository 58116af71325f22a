"""No code from data: the package never unpickles, evaluates or runs remote code it was handed."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import kwanzaa_adapter
from tiny_artifact import tiny_artifact  # noqa: F401 - the session fixture

PACKAGE = Path(kwanzaa_adapter.__file__).resolve().parent
# Calls that turn bytes into running code, by dotted name as written in the source.
FORBIDDEN = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.load", "marshal.loads", "dill.load",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "eval", "exec", "compile", "__import__",
    "torch.jit.load", "joblib.load",
}  # fmt: skip


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_calls(source: str, filename: str) -> list[str]:
    """`file:line: why` for each call that could run code from data."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}"
        if name in FORBIDDEN:
            found.append(f"{where}: {name}()")
        if name.endswith("torch.load"):
            weights_only = _keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if name.endswith("numpy.load") or name.endswith("np.load"):
            allow = _keyword(node, "allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                found.append(f"{where}: numpy.load(allow_pickle=True)")
        remote = _keyword(node, "trust_remote_code")
        if isinstance(remote, ast.Constant) and remote.value is True:
            found.append(f"{where}: trust_remote_code=True hard-coded (it must come from the config)")
    return found


def test_package_has_no_unsafe_loads():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = [found for path in files
                for found in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))]
    assert problems == []


def test_scanner_catches_each_unsafe_pattern():
    source = (
        "import pickle, torch, yaml, numpy as np\n"
        "pickle.loads(b'')\n"
        "torch.load('x.pt')\n"
        "torch.load('x.pt', weights_only=False)\n"
        "yaml.load('a: 1')\n"
        "np.load('x.npy', allow_pickle=True)\n"
        "AutoModel.from_pretrained('x', trust_remote_code=True)\n"
        "eval('1')\n"
        "torch.load('ok.pt', weights_only=True)\n"
        "AutoModel.from_pretrained('x', trust_remote_code=config.model.trust_remote_code)\n"
    )
    found = unsafe_calls(source, "sample.py")
    assert [f.split(":")[1] for f in found] == ["2", "3", "4", "5", "6", "7", "8"]


def test_trust_remote_code_is_off_by_default_and_recorded_in_metadata(tiny_artifact):  # noqa: F811
    from kwanzaa_adapter.config import ModelConfig

    assert ModelConfig.model_fields["trust_remote_code"].default is False
    _, artifact = tiny_artifact
    metadata = json.loads((artifact / "metadata.json").read_text(encoding="utf-8"))
    recorded = [value for key, value in _flatten(metadata) if key.endswith("trust_remote_code")]
    assert recorded == [False]


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _flatten(child, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, value
