"""Property: any mutation of a valid record or config is either accepted or refused with a clear
error (exit 2 from the CLI); it never escapes as an exception or a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kwanzaa_adapter import cli
from kwanzaa_adapter.config import ConfigError, load_training_config
from kwanzaa_adapter.data.validation import validate_file

from .corpus import TRAIN_RECORDS, _valid_config

RECORD = json.loads(TRAIN_RECORDS.read_text(encoding="utf-8").splitlines()[0])
CONFIG = _valid_config()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every path to a node of a JSON tree, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


@st.composite
def mutated(draw, original):
    """`original` with one node replaced by an arbitrary JSON value, or deleted."""
    tree = json.loads(json.dumps(original))
    path = draw(st.sampled_from(list(_paths(tree))))
    if not path:
        return draw(json_values)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        parent[path[-1]] = draw(json_values)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    return tree


@st.composite
def byte_mutated(draw, text: str):
    """`text` with a few bytes overwritten, inserted or deleted at random places."""
    data = bytearray(text.encode("utf-8"))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["overwrite", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if action == "insert" or at == len(data):
            data.insert(at, byte)
        elif action == "overwrite":
            data[at] = byte
        else:
            del data[at]
    return bytes(data)


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(record=mutated(RECORD))
def test_mutated_record_is_accepted_or_reported(tmp_path: Path, record) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    result = validate_file(path)
    assert result.ok or result.issues and all(issue.line == 1 for issue in result.issues)


@SETTINGS
@given(raw=byte_mutated(json.dumps(RECORD)))
def test_byte_mutated_record_is_accepted_or_reported(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(raw + b"\n")
    result = validate_file(path)
    assert result.ok or result.issues


@SETTINGS
@given(config=mutated(CONFIG))
def test_mutated_config_is_accepted_or_reported(tmp_path: Path, config) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    try:
        load_training_config(path)
    except ConfigError as exc:
        assert str(exc).strip()


@SETTINGS
@given(raw=byte_mutated(yaml.safe_dump(CONFIG)))
def test_byte_mutated_config_dry_run_exits_0_or_2(tmp_path: Path, raw: bytes, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(raw)
    before = sorted(tmp_path.iterdir())
    code = cli.main(["train", "--dry-run", "--config", str(path), "--output-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    assert "Traceback" not in out + err
    assert code == 0 or err.startswith("error:")
    assert sorted(tmp_path.iterdir()) == before  # a dry run writes nothing, valid or not
