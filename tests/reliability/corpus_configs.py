"""Hostile run configs: broken YAML, unknown keys, values out of range, bad profiles and `--set` overrides.

Every case is refused by `train` before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .corpus_base import Case, _drop, _set, _train


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

