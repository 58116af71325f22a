"""A corpus of hostile inputs: malformed configs, datasets, artifacts and model references.

`build_corpus(root)` writes each case's files under `root/<case name>/` and returns the command
line that must refuse it: exit 1 (a failed verification) or 2 (bad input), one clear message that
gives the case's own reason (`HostileCase.reason`, a fragment of it), no traceback, no hang, and
nothing written. Used by tests/reliability/test_hostile_inputs.py (in
process) and by bench/reliability.py (one subprocess per case, time-boxed).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
TRAIN_RECORDS = REPO / "data" / "kwanzaa_train_records.jsonl"
EVAL_DATA = REPO / "data" / "kwanzaa_eval.jsonl"


@dataclass(frozen=True)
class HostileCase:
    name: str
    kind: str  # config | data | artifact | model
    argv: tuple[str, ...]
    reason: str  # a fragment of the message that must refuse it: refused for another reason is a failure
    expected_exit: int = 2

    def gives_reason(self, message: str) -> bool:
        """Whether `message` names this case's reason (whitespace runs count as one space)."""
        return " ".join(self.reason.split()) in " ".join(message.split())


# name -> (reason it must be refused, maker of its files returning the command line)
Case = tuple[str, Callable[[Path], tuple[str, ...]]]


def _valid_config() -> dict:
    """configs/demo.yaml with its profiles merged in and absolute data paths: a self-contained run file."""
    from kwanzaa_adapter.config import load_training_config

    config = load_training_config(DEMO_CONFIG).model_dump(mode="json")
    config["data"]["train_file"] = str(REPO / "data" / "kwanzaa_train.jsonl")
    config["data"]["eval_file"] = str(EVAL_DATA)
    return config


def _set(config: dict, dotted: str, value) -> dict:
    copy = json.loads(json.dumps(config))
    *parents, leaf = dotted.split(".")
    node = copy
    for key in parents:
        node = node[key]
    node[leaf] = value
    return copy


def _drop(config: dict, dotted: str) -> dict:
    copy = json.loads(json.dumps(config))
    *parents, leaf = dotted.split(".")
    node = copy
    for key in parents:
        node = node[key]
    del node[leaf]
    return copy


def _train(case_dir: Path, config_path: Path, *extra: str) -> tuple[str, ...]:
    return ("train", "--config", str(config_path), "--output-dir", str(case_dir / "out"), *extra)


# --- configs ------------------------------------------------------------------------------------


def _config_cases(valid: dict) -> dict[str, Case]:
    def text(body: str | bytes, *extra: str):
        def make(case_dir: Path) -> tuple[str, ...]:
            path = case_dir / "run.yaml"
            path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
            return _train(case_dir, path, *extra)

        return make

    def mapping(value, *extra: str):
        return text(yaml.safe_dump(value, sort_keys=False), *extra)

    def profile(files: dict[str, str]):
        def make(case_dir: Path) -> tuple[str, ...]:
            for name, body in files.items():
                (case_dir / name).write_text(body, encoding="utf-8")
            return _train(case_dir, case_dir / "run.yaml")

        return make

    def no_file(case_dir: Path) -> tuple[str, ...]:
        return _train(case_dir, case_dir / "missing.yaml")

    def directory(case_dir: Path) -> tuple[str, ...]:
        (case_dir / "run.yaml").mkdir()
        return _train(case_dir, case_dir / "run.yaml")

    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    )
    return {
        "config_yaml_syntax": ("run.yaml:2:9: invalid YAML", text("run: {name: demo\ntraining: [1, 2\n")),
        "config_tab_indent": ("found character '\\t' that cannot start any token", text("run:\n\tname: demo\n")),
        "config_top_level_list": ("top level must be a mapping of sections, got list", text("- run\n- data\n")),
        "config_scalar": ("top level must be a mapping of sections, got str", text("just a string\n")),
        "config_empty": ("model: required key is missing", text("")),
        "config_binary": ("cannot read: 'utf-8' codec can't decode", text(bytes(range(256)) * 4)),
        "config_not_utf8": ("'utf-8' codec can't decode byte 0xff", text(b"run:\n  name: \xff\xfe demo\n")),
        "config_nul_bytes": ("unacceptable character #x0000", text("run:\n  name: de\x00mo\n")),
        "config_unknown_top_key": ("trainning: unknown key", mapping({**valid, "trainning": {"lr": 1}})),
        "config_unknown_nested_key": (
            "training.learnig_rate: unknown key", mapping(_set(valid, "training.learnig_rate", 1e-4))),
        "config_type_string_for_float": (
            "training.learning_rate: Input should be a valid number",
            mapping(_set(valid, "training.learning_rate", "fast"))),
        "config_negative_learning_rate": (
            "training.learning_rate: Input should be greater than 0",
            mapping(_set(valid, "training.learning_rate", -1.0))),
        "config_rank_zero": ("adapter.r: Input should be greater than 0", mapping(_set(valid, "adapter.r", 0))),
        "config_dropout_above_one": (
            "adapter.dropout: Input should be less than 1", mapping(_set(valid, "adapter.dropout", 1.5))),
        "config_seq_length_zero": (
            "data.max_seq_length: Input should be greater than 0", mapping(_set(valid, "data.max_seq_length", 0))),
        "config_unknown_batching": (
            "data.batching: Input should be 'packed' or 'length_grouped'",
            mapping(_set(valid, "data.batching", "sideways"))),
        "config_empty_target_modules": (
            "adapter.target_modules: List should have at least 1 item",
            mapping(_set(valid, "adapter.target_modules", []))),
        "config_bad_version": ("run.version: must be a semantic version", mapping(_set(valid, "run.version", "one"))),
        "config_missing_section": ("data: required key is missing", mapping(_drop(valid, "data"))),
        "config_section_is_list": (
            "training: Input should be a valid dictionary", mapping(_set(valid, "training", [1, 2]))),
        "config_huge_integer": (
            "training.per_device_batch_size: Input should be less than or equal to 65536",
            mapping(_set(valid, "training.per_device_batch_size", 10**40))),
        "config_nan_learning_rate": (
            "training.learning_rate: Input should be a finite number",
            text(yaml.safe_dump(_set(valid, "training.learning_rate", 0.5)).replace(
                "learning_rate: 0.5", "learning_rate: .nan"))),
        "config_missing_profile": (
            "nope.yaml: file not found",
            profile({"run.yaml": yaml.safe_dump({**valid, "adapter_profile": "nope.yaml"})})),
        "config_recursive_profile": ("profile includes itself", profile({
            "run.yaml": yaml.safe_dump({**_drop(valid, "adapter"), "adapter_profile": "a.yaml"}),
            "a.yaml": "adapter_profile: b.yaml\n",
            "b.yaml": "adapter_profile: a.yaml\n",
        })),
        "config_profile_is_list": ("a.yaml: top level must be a mapping of sections, got list", profile({
            "run.yaml": yaml.safe_dump({**_drop(valid, "adapter"), "adapter_profile": "a.yaml"}),
            "a.yaml": "- 1\n- 2\n",
        })),
        "config_billion_laughs": ("run.yaml: a: unknown key", text(laughs)),
        "config_deep_nesting": ("YAML nests too deeply to be a config", text("a: " + "[" * 5000 + "]" * 5000 + "\n")),
        "config_file_missing": ("missing.yaml: file not found", no_file),
        "config_is_directory": ("Is a directory", directory),
        "config_missing_train_file": (
            "file not found: /nonexistent/train.jsonl",
            mapping(_set(valid, "data.train_file", "/nonexistent/train.jsonl"))),
        "config_set_without_equals": (
            "--set training.learning_rate: expected key.path=value",
            mapping(valid, "--set", "training.learning_rate")),
        "config_set_unknown_key": ("training.nope: unknown key", mapping(valid, "--set", "training.nope=1")),
        "config_set_bad_type": (
            "training.num_epochs: Input should be a valid number",
            mapping(valid, "--set", "training.num_epochs=many")),
    }


# --- datasets -----------------------------------------------------------------------------------


def _data_cases() -> dict[str, Case]:
    good = TRAIN_RECORDS.read_text(encoding="utf-8").splitlines()[0]
    record = json.loads(good)

    def lines(*rows: str | bytes):
        def make(case_dir: Path) -> tuple[str, ...]:
            path = case_dir / "data.jsonl"
            path.write_bytes(b"".join((r if isinstance(r, bytes) else r.encode("utf-8")) + b"\n" for r in rows))
            return ("validate-data", str(path))

        return make

    def edited(**changes) -> str:
        value = json.loads(good)
        for key, new in changes.items():
            if new is None:
                value.pop(key, None)
            else:
                value[key] = new
        return json.dumps(value)

    def many_rows(case_dir: Path) -> tuple[str, ...]:
        path = case_dir / "data.jsonl"
        head, tail = good.split(json.dumps(record["id"]), 1)
        with path.open("w", encoding="utf-8") as handle:
            for number in range(100_000):
                handle.write(f'{head}"row-{number}"{tail}\n')
            handle.write('{"id": "last", "question": "?"}\n')
        return ("validate-data", str(path))

    def fifo(case_dir: Path) -> tuple[str, ...]:
        path = case_dir / "data.jsonl"
        os.mkfifo(path)
        return ("validate-data", str(path))

    def directory(case_dir: Path) -> tuple[str, ...]:
        (case_dir / "data.jsonl").mkdir()
        return ("validate-data", str(case_dir / "data.jsonl"))

    def missing(case_dir: Path) -> tuple[str, ...]:
        return ("validate-data", str(case_dir / "absent.jsonl"))

    def through_train(case_dir: Path) -> tuple[str, ...]:
        path = case_dir / "data.jsonl"
        path.write_text(good + "\n{not json\n", encoding="utf-8")
        config = _set(_valid_config(), "data.train_file", str(path))
        (case_dir / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        return _train(case_dir, case_dir / "run.yaml")

    bad_answer = dict(record["answer"], version="kwanzaa.answer.v0")
    wrong_citation = json.loads(json.dumps(record["answer"]))
    wrong_citation["answer"]["text"] += " [7]."
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    return {
        "data_not_json": ("data.jsonl:1: invalid_json", lines("{this is not json")),
        "data_json_array": ("line is a JSON list, not an object", lines("[1, 2, 3]")),
        "data_json_string": ("line is a JSON str, not an object", lines('"a string"')),
        "data_empty_file": ("the file holds no records", lines()),
        "data_blank_lines_only": ("data.jsonl:2: blank_line", lines("", "   ")),
        "data_missing_question": ("schema: question: missing", lines(edited(question=None))),
        "data_empty_question": ("question: question is empty", lines(edited(question="   "))),
        "data_documents_not_list": ("documents: must be a list", lines(edited(documents="doc"))),
        "data_expect_refusal_string": (
            "expect_refusal: must be true or false", lines(edited(expect_refusal="maybe"))),
        "data_unknown_field": ("extra_field: unknown key", lines(edited(extra_field=1))),
        "data_answer_wrong_version": ("answer.version: must be kwanzaa.answer.v1", lines(edited(answer=bad_answer))),
        "data_citation_out_of_range": (
            "cites document(s) [7] but only 3 are provided", lines(edited(answer=wrong_citation))),
        "data_chat_unknown_role": (
            "messages[0].role: must be one of system, user, assistant",
            lines(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}))),
        "data_chat_no_assistant": (
            "messages: no assistant turn", lines(json.dumps({"messages": chat["messages"][:1]}))),
        "data_chat_empty_content": (
            "messages[1].content: content is empty",
            lines(json.dumps({"messages": [chat["messages"][0], {"role": "assistant", "content": ""}]}))),
        "data_duplicate_ids": ("already used on line 1", lines(good, good)),
        "data_huge_line": ("over the 1048576-byte limit", lines(edited(question="why " * 3_000_000))),
        "data_deep_nesting": (
            "JSON nests deeper than 64 levels", lines('{"id": ' + "[" * 100_000 + "]" * 100_000 + "}")),
        "data_nul_bytes": (
            "invalid_json: Invalid control character",
            lines(good.replace('"question": "', '"question": "\u0000', 1).encode("utf-8")
                  .replace(b"\\u0000", b"\x00"))),
        "data_not_utf8": ("invalid UTF-8 at byte 9", lines(b'{"id": "x\xff\xfe", "question": "q"}')),
        "data_100k_rows_bad_last": ("data.jsonl:100001: schema", many_rows),
        "data_fifo": ("is not a regular file", fifo),
        "data_is_directory": ("is not a regular file", directory),
        "data_file_missing": ("file not found", missing),
        "data_bad_line_through_train": ("data.jsonl:2: invalid_json", through_train),
    }


# --- artifacts ----------------------------------------------------------------------------------


def _sealed_artifact(case_dir: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    from kwanzaa_adapter.safety.artifacts import seal_artifact

    root = case_dir / "artifact"
    root.mkdir()
    (root / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}\n')
    tensors = weights or {"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(4, 8)}
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "metadata.json").write_text('{"artifact_version": "1.0.0"}\n')
    (root / "training_config.yaml").write_text("run:\n  name: hostile\n")
    (root / "training_metrics.json").write_text('{"eval_loss": 1.5}\n')
    (root / "README.md").write_text("# Adapter\n")
    seal_artifact(root)
    return root


def _raw_safetensors(header: dict | bytes, data: bytes, declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def _artifact_cases() -> dict[str, Case]:
    def after_seal(change: Callable[[Path], None], reseal: bool = False):
        def make(case_dir: Path) -> tuple[str, ...]:
            root = _sealed_artifact(case_dir)
            change(root)
            if reseal:
                from kwanzaa_adapter.safety.artifacts import build_manifest, write_manifest

                write_manifest(build_manifest(root), root / "checksums.json")
            return ("verify", str(root))

        return make

    def weights_file(content: bytes):
        return after_seal(lambda root: (root / "adapter_model.safetensors").write_bytes(content), reseal=True)

    def manifest_entry(path: str):
        def change(root: Path) -> None:
            manifest = json.loads((root / "checksums.json").read_text())
            manifest["files"][path] = {"sha256": "0" * 64, "size": 1}
            (root / "checksums.json").write_text(json.dumps(manifest))

        return after_seal(change)

    def flip_byte(root: Path) -> None:
        path = root / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))

    def duplicate_entry(root: Path) -> None:
        text = (root / "checksums.json").read_text()
        entry = '"README.md": {"sha256": "' + "0" * 64 + '", "size": 1}, '
        (root / "checksums.json").write_text(text.replace('"README.md": ', entry + '"README.md": ', 1))

    def nan_weights(case_dir: Path) -> tuple[str, ...]:
        tensor = torch.ones(4, 8)
        tensor[1, 2] = float("nan")
        return ("verify", str(_sealed_artifact(case_dir, {"base_model.model.layers.0.q_proj.lora_A.weight": tensor})))

    def symlinked_dir(case_dir: Path) -> tuple[str, ...]:
        root = _sealed_artifact(case_dir)
        (case_dir / "link").symlink_to(root)
        return ("verify", str(case_dir / "link"))

    def missing_dir(case_dir: Path) -> tuple[str, ...]:
        return ("verify", str(case_dir / "absent"))

    def file_not_dir(case_dir: Path) -> tuple[str, ...]:
        (case_dir / "artifact").write_text("not a directory")
        return ("verify", str(case_dir / "artifact"))

    span = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    return {
        "artifact_flipped_byte": ("mismatched adapter_model.safetensors: sha256 expected", after_seal(flip_byte)),
        "artifact_missing_weights": (
            "missing adapter_model.safetensors",
            after_seal(lambda root: (root / "adapter_model.safetensors").unlink())),
        "artifact_missing_manifest": (
            "missing checksums.json", after_seal(lambda root: (root / "checksums.json").unlink())),
        "artifact_manifest_not_json": (
            "checksums.json: not valid JSON", after_seal(lambda root: (root / "checksums.json").write_text("{nope"))),
        "artifact_manifest_is_list": (
            "checksums.json: expected an object",
            after_seal(lambda root: (root / "checksums.json").write_text("[]"))),
        "artifact_extra_file": (
            "extra notes.txt (not listed in checksums.json)",
            after_seal(lambda root: (root / "notes.txt").write_text("hello"))),
        "artifact_truncated_header": ("shorter than the 8-byte header length", weights_file(b"\x10\x00\x00")),
        "artifact_oversized_header_length": (
            "header length 1099511627776 exceeds the file",
            weights_file(_raw_safetensors(span, bytes(8), declared=2**40))),
        "artifact_header_not_json": (
            "header is not valid UTF-8 JSON", weights_file(_raw_safetensors(b"{not json}", bytes(8)))),
        "artifact_overlapping_offsets": ("tensor data overlap", weights_file(_raw_safetensors(overlap, bytes(12)))),
        "artifact_offsets_past_end": (
            "data_offsets [0, 8] fall outside the 4-byte data area", weights_file(_raw_safetensors(span, bytes(4)))),
        "artifact_nan_weights": ("holds NaN or infinite values", nan_weights),
        "artifact_pickle_renamed": (
            "adapter_model.safetensors: is not a valid safetensors file",
            weights_file(pickle.dumps({"weight": [1.0, 2.0]}))),
        "artifact_pickle_file_listed": ("optimizer.pt: is a pickle-format file", after_seal(
            lambda root: (root / "optimizer.pt").write_bytes(pickle.dumps({"x": 1})), reseal=True)),
        "artifact_manifest_dotdot": ("manifest path contains '..'", manifest_entry("../outside.txt")),
        "artifact_manifest_absolute": ("manifest path is absolute", manifest_entry("/etc/passwd")),
        "artifact_manifest_nul": ("manifest path contains a NUL byte", manifest_entry("adapter\x00.safetensors")),
        "artifact_manifest_duplicate": ("README.md: is listed more than once", after_seal(duplicate_entry)),
        "artifact_symlink_inside": (
            "link.json: is a symlink", after_seal(lambda root: (root / "link.json").symlink_to("/etc/hostname"))),
        "artifact_fifo_inside": (
            "pipe.json: is not a regular file", after_seal(lambda root: os.mkfifo(root / "pipe.json"))),
        "artifact_symlinked_directory": ("link: is a symlink; give the real artifact directory", symlinked_dir),
        "artifact_directory_missing": ("absent: does not exist", missing_dir),
        "artifact_is_a_file": ("artifact: is not a directory", file_not_dir),
    }


# --- model references ---------------------------------------------------------------------------


def _model_cases() -> dict[str, Case]:
    def prepare(make_path: Callable[[Path], str]):
        def make(case_dir: Path) -> tuple[str, ...]:
            return ("prepare-model", make_path(case_dir))

        return make

    def garbage_gguf(case_dir: Path) -> str:
        (case_dir / "model.gguf").write_bytes(b"GGUF" + bytes(range(200)))
        return str(case_dir / "model.gguf")

    def empty_dir(case_dir: Path) -> str:
        (case_dir / "model").mkdir()
        return str(case_dir / "model")

    def bad_config_dir(case_dir: Path) -> str:
        (case_dir / "model").mkdir()
        (case_dir / "model" / "config.json").write_text("{broken")
        return str(case_dir / "model")

    def train_with(reference: str):
        def make(case_dir: Path) -> tuple[str, ...]:
            config = _set(_valid_config(), "model.name_or_path", reference)
            (case_dir / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
            return _train(case_dir, case_dir / "run.yaml")

        return make

    return {
        "model_local_path_missing": (
            "no-such-model' is not a packaged model", prepare(lambda d: str(d / "no-such-model"))),
        "model_hub_id_offline": (
            "cannot download 'nobody-here/not-a-model-xyz' from the Hugging Face hub",
            prepare(lambda d: "nobody-here/not-a-model-xyz")),
        "model_garbage_gguf": ("not a loadable GGUF model", prepare(garbage_gguf)),
        "model_empty_directory": ("is a directory without config.json", prepare(empty_dir)),
        "model_broken_config_json": ("config.json: not a readable model config", prepare(bad_config_dir)),
        "model_reference_with_dotdot": (
            "'../../etc/passwd' is not a packaged model", prepare(lambda d: "../../etc/passwd")),
        "model_unknown_packaged_name": (
            "'smollm2-999b-instruct' is not a packaged model (smollm2-135m-instruct)",
            train_with("smollm2-999b-instruct")),
    }


def build_corpus(root: Path) -> list[HostileCase]:
    """Write every case under `root` and return them; case names are unique directory names."""
    valid = _valid_config()
    groups = {"config": _config_cases(valid), "data": _data_cases(), "artifact": _artifact_cases(),
              "model": _model_cases()}
    cases = []
    for kind, makers in groups.items():
        for name, (reason, make) in makers.items():
            case_dir = root / name
            case_dir.mkdir(parents=True)
            argv = make(case_dir)
            cases.append(HostileCase(name, kind, argv, reason, 1 if kind == "artifact" else 2))
    return cases


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of everything under `directory`, links not followed."""
    state = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        state[str(path.relative_to(directory))] = (info.st_size, info.st_mtime_ns)
    return state
