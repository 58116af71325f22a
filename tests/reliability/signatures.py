"""Attacks on a signed artifact: each must be refused with exit 1, naming its reason, before any weight loads.

`build_signature_attacks(root)` signs small sealed artifacts with a trusted key, attacks each copy
in one way, and returns two command lines per attack: `verify --public-key` (the check a user runs)
and `generate --trusted-key` (the backend, which must refuse before the base model loads). Used by
tests/test_signing.py (in process) and bench/reliability.py (subprocesses: `signature_attacks`,
`signature_caught`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from .corpus import EVAL_DATA, HostileCase, _sealed_artifact, _valid_config

WEIGHTS = "adapter_model.safetensors"


def _reseal(root: Path) -> None:
    """What an attacker with write access does after replacing files: recompute checksums.json."""
    from kwanzaa_adapter.safety.artifacts import seal_artifact

    seal_artifact(root)


def _replace_weights(root: Path, _: Path) -> None:
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.full((4, 8), 7.0)}, str(root / WEIGHTS))
    _reseal(root)


def _signature_of_another_artifact(root: Path, work: Path) -> None:
    (work / "other").mkdir()
    other = _sealed_artifact(work / "other", {"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 8)})
    _sign(other, work / "keys" / "trusted")
    shutil.copyfile(other / "model.sig", root / "model.sig")


def _signed_by_untrusted_key(root: Path, work: Path) -> None:
    _sign(root, work / "keys" / "untrusted", replace=True)


def _file_added(root: Path, _: Path) -> None:
    (root / "notes.txt").write_text("added after signing\n")
    _reseal(root)  # checksums.json agrees: only the signature can tell


def _symlink(root: Path, _: Path) -> None:
    os.symlink(root / "metadata.json", root / "extra.json")


def _truncated_signature(root: Path, _: Path) -> None:
    raw = (root / "model.sig").read_bytes()
    (root / "model.sig").write_bytes(raw[: len(raw) // 2])


def _garbage_signature(root: Path, _: Path) -> None:
    (root / "model.sig").write_bytes(bytes(range(256)) * 4)


def _signature_removed(root: Path, _: Path) -> None:
    (root / "model.sig").unlink()


def _statement_altered(root: Path, _: Path) -> None:
    """The signed statement edited to match replaced weights, the signature bytes kept."""
    from kwanzaa_adapter.safety.artifacts import sha256_file

    _replace_weights(root, _)
    bundle = json.loads((root / "model.sig").read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    for resource in statement["predicate"]["resources"]:
        resource["digest"] = sha256_file(root / resource["name"])[0]
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (root / "model.sig").write_text(json.dumps(bundle))


# name -> (reason the refusal must give, attack on a signed copy)
ATTACKS: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    "weights_replaced_checksums_recomputed": ("file changed after signing", _replace_weights),
    "signature_copied_from_another_artifact": ("file changed after signing", _signature_of_another_artifact),
    "signed_by_untrusted_key": ("signed by an untrusted key", _signed_by_untrusted_key),
    "file_added_after_signing": ("file added after signing", _file_added),
    "symlink_added": ("symlink", _symlink),
    "signature_truncated": ("malformed signature", _truncated_signature),
    "signature_garbage": ("malformed signature", _garbage_signature),
    "signature_removed": ("unsigned", _signature_removed),
    "statement_altered_signature_kept": ("bad signature", _statement_altered),
}


def _sign(root: Path, key: Path, replace: bool = False) -> None:
    from kwanzaa_adapter.safety.signing import sign_artifact

    sign_artifact(root, key, replace=replace)


def make_keys(directory: Path) -> dict[str, Path]:
    """Two key pairs, `trusted` and `untrusted` (private key path; the public key beside it as .pub)."""
    from kwanzaa_adapter.safety.signing import generate_key_pair

    directory.mkdir(parents=True, exist_ok=True)
    keys = {}
    for name in ("trusted", "untrusted"):
        keys[name] = directory / name
        if not keys[name].exists():
            generate_key_pair(keys[name], directory / f"{name}.pub")
    return keys


def backend_inputs(root: Path) -> tuple[Path, Path]:
    """(run config, input JSONL) that `generate` accepts: a refusal can only come from the adapter."""
    config, records = root / "run.yaml", root / "input.jsonl"
    if not config.exists():
        config.write_text(yaml.safe_dump(_valid_config()), encoding="utf-8")
        first = EVAL_DATA.read_text(encoding="utf-8").splitlines()[0]
        records.write_text(first + "\n", encoding="utf-8")
    return config, records


def build_signature_attacks(root: Path) -> list[HostileCase]:
    """Every attack on its own signed copy, twice: `verify --public-key` and `generate --trusted-key`."""
    keys = make_keys(root / "keys")
    trusted = Path(f"{keys['trusted']}.pub")
    config, records = backend_inputs(root)
    cases = []
    for name, (reason, attack) in ATTACKS.items():
        work = root / name
        work.mkdir()
        artifact = _sealed_artifact(work)
        _sign(artifact, keys["trusted"])
        attack(artifact, root)
        cases.append(HostileCase(f"{name}/verify", "signature", ("verify", str(artifact), "--public-key", str(trusted)),
                                 reason, 1))
        cases.append(HostileCase(f"{name}/generate", "signature",
                                 ("generate", "--config", str(config), "--adapter", str(artifact), "--input",
                                  str(records), "--trusted-key", str(trusted)), reason, 1))
    return cases


ANCHOR_REASON = "refused as a trusted key"


def build_anchor_cases(root: Path) -> list[HostileCase]:
    """The attack a key beside the artifact invites: an artifact forged and signed anew, its new public key
    left in the run directory (or the artifact) and offered as the trust anchor, by its path or as a copy
    taken from there. Each through `verify --public-key` and `generate --trusted-key`: exit 2, its reason."""
    from kwanzaa_adapter.safety.anchors import RUN_MARKER
    from kwanzaa_adapter.safety.signing import generate_key_pair

    config, records = backend_inputs(root)
    cases = []
    for where in ("run_directory", "artifact", "copy_outside"):
        run = root / f"anchor-{where}"
        run.mkdir()
        (run / RUN_MARKER).write_text("{}\n")  # what marks a run directory
        artifact = _sealed_artifact(run)
        keys = artifact if where == "artifact" else run
        generate_key_pair(keys / "signing_key", keys / "signing_key.pub")
        _reseal(artifact)
        _sign(artifact, keys / "signing_key")
        offered = keys / "signing_key.pub"
        if where == "copy_outside":
            (root / "elsewhere").mkdir(exist_ok=True)
            offered = Path(shutil.copyfile(offered, root / "elsewhere" / "copied.pub"))
        cases.append(HostileCase(f"anchor_{where}/verify", "anchor", ("verify", str(artifact), "--public-key",
                                                                      str(offered)), ANCHOR_REASON, 2))
        cases.append(HostileCase(f"anchor_{where}/generate", "anchor",
                                 ("generate", "--config", str(config), "--adapter", str(artifact), "--input",
                                  str(records), "--trusted-key", str(offered)), ANCHOR_REASON, 2))
    return cases


def attack_name(case: HostileCase) -> str:
    return case.name.split("/")[0]
