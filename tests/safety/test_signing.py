"""Signed artifacts (OpenSSF model signing): sign, verify with a trust policy, the library's own CLI
both ways, training that signs in step 7, and every attack refused before a weight is read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from conftest import ROOT
from helpers import running
from kwanzaa_adapter import cli
from kwanzaa_adapter.backend.models import causal_lm, model_from_config
from kwanzaa_adapter.backend.serving.schemas import ServeLimits
from kwanzaa_adapter.backend.serving.server import create_app
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.safety.artifacts import seal_artifact
from kwanzaa_adapter.safety import signing
from kwanzaa_adapter.training.workflow import train_adapter
from reliability.signatures import attack_name, build_signature_attacks, make_keys
from tiny_artifact import copy_artifact, tiny_artifact  # noqa: F401


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def signed(tiny_artifact, keys, tmp_path) -> Path:
    artifact = copy_artifact(tiny_artifact[1], tmp_path / "artifact")
    assert cli.main(["sign", str(artifact), "--private-key", str(keys["trusted"])]) == 0
    return artifact


def pub(key: Path) -> str:
    return f"{key}.pub"


def library_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_signing", *args], capture_output=True, text=True, timeout=120)


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path, capsys):
    assert cli.main(["keygen", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    fingerprint = signing.public_key_fingerprint(tmp_path / "k.pub")
    assert f"key sha256:{fingerprint}" in capsys.readouterr().out
    assert signing.private_key_fingerprint(tmp_path / "k") == fingerprint
    assert cli.main(["keygen", str(tmp_path / "k")]) == 2  # never overwritten


def test_signed_artifact_verifies_with_its_key_and_only_with_it(signed, keys, capsys):
    assert cli.main(["verify", str(signed), "--public-key", pub(keys["trusted"])]) == 0
    out = capsys.readouterr().out
    assert "signature OK" in out and "covers 8 file(s)" in out  # the 7 files of checksums.json, and it
    assert cli.main(["verify", str(signed)]) == 0  # no key: the checksums, as before
    assert "present, not checked" in capsys.readouterr().out
    assert cli.main(["verify", str(signed), "--public-key", pub(keys["untrusted"])]) == 1
    assert "signed by an untrusted key" in capsys.readouterr().out
    # Any of several trusted keys will do.
    assert cli.main(["verify", str(signed), "--public-key", pub(keys["untrusted"]),
                     "--public-key", pub(keys["trusted"])]) == 0


def test_the_signature_covers_the_checksum_manifest_but_not_itself(signed, keys):
    from kwanzaa_adapter.safety.artifacts import verify_artifact

    manifest = json.loads((signed / "checksums.json").read_text())
    assert signing.SIGNATURE_NAME not in manifest["files"]
    # Rewritten with other whitespace: still the same manifest to `verify`, not the signed bytes.
    (signed / "checksums.json").write_text(json.dumps(manifest))
    assert verify_artifact(signed).ok
    report = signing.verify_signature(signed, [pub(keys["trusted"])])
    assert (report.reason, report.changed) == (signing.CHANGED, ("checksums.json",))


def test_a_signature_that_leaves_a_file_out_is_refused(signed, keys):
    from model_signing import hashing
    from model_signing import signing as library

    # Valid, by the trusted key, but the signer excluded the weights: the library alone would accept it.
    config = hashing.Config().set_ignored_paths(paths=["model.sig", "adapter_model.safetensors"])
    library.Config().use_elliptic_key_signer(private_key=keys["trusted"]).set_hashing_config(config).sign(
        signed, signed / "model.sig")
    report = signing.verify_signature(signed, [pub(keys["trusted"])])
    assert report.reason == signing.NOT_COVERED and "adapter_model.safetensors" in report.detail


def test_the_library_cli_accepts_our_signature_and_we_accept_its(signed, keys, tmp_path, capsys):
    ours = library_cli("verify", "key", str(signed), "--signature", str(signed / "model.sig"),
                       "--public_key", pub(keys["trusted"]))
    assert ours.returncode == 0, ours.stdout + ours.stderr
    (signed / "model.sig").unlink()
    theirs = library_cli("sign", "key", str(signed), "--signature", str(signed / "model.sig"),
                         "--private_key", str(keys["trusted"]))
    assert theirs.returncode == 0, theirs.stdout + theirs.stderr
    assert cli.main(["verify", str(signed), "--public-key", pub(keys["trusted"])]) == 0
    assert "signature OK" in capsys.readouterr().out
    # And the library refuses what we refuse: a file replaced after signing.
    (signed / "README.md").write_text("# replaced\n")
    refused = library_cli("verify", "key", str(signed), "--signature", str(signed / "model.sig"),
                          "--public_key", pub(keys["trusted"]))
    assert refused.returncode == 1 and "README.md" in refused.stdout + refused.stderr


def test_every_attack_is_refused_for_its_reason_before_any_weight_loads(tmp_path, capsys, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the base model was loaded for a refused adapter")

    monkeypatch.setattr(causal_lm, "load_base_as_trained", must_not_load)
    cases = build_signature_attacks(tmp_path)
    assert len({attack_name(case) for case in cases}) >= 7
    failures = []
    for case in cases:
        code = cli.main(list(case.argv))
        out, err = capsys.readouterr()
        message = err or out
        if code != 1 or "Traceback" in out + err or not case.gives_reason(message):
            failures.append(f"{case.name}: exit {code}, {message[-300:]!r}")
    assert failures == []


def test_an_adapter_swapped_after_verification_is_refused_when_attached(tiny_artifact, signed, keys, monkeypatch):
    """The base model loads between the first check and attachment (minutes for a 7B): weights swapped then,
    with checksums.json recomputed, pass the checksums but not the signature, checked again at attachment."""
    config = load_training_config(tiny_artifact[0], ("evaluation.max_new_tokens=4",))
    load_base = causal_lm.load_base_as_trained

    def swap_then_load(*args, **kwargs):
        weights = signed / "adapter_model.safetensors"
        save_file({name: tensor + 0.5 for name, tensor in load_file(weights).items()}, weights)
        seal_artifact(signed)
        return load_base(*args, **kwargs)

    monkeypatch.setattr(causal_lm, "load_base_as_trained", swap_then_load)
    with pytest.raises(signing.SignatureError, match="file changed after signing"):
        model_from_config(config, adapter=signed, trusted_keys=(pub(keys["trusted"]),))


def test_backend_serves_a_signed_adapter_and_refuses_an_unsigned_one(tiny_artifact, signed, keys, capsys):
    config = load_training_config(tiny_artifact[0], ("evaluation.max_new_tokens=4",))
    model = model_from_config(config, adapter=signed, trusted_keys=(pub(keys["trusted"]),))
    with running(create_app(model, ServeLimits())) as url:
        health = httpx.get(f"{url}/healthz", timeout=30).json()
    assert health["adapter"]["path"] == str(signed)
    # The same trust policy from the config file, against the unsigned original: refused, exit 1.
    code = cli.main(["generate", "--config", str(tiny_artifact[0]), "--adapter", str(tiny_artifact[1]),
                     "--input", str(Path(__file__).parent / "missing.jsonl"),
                     "--set", f"artifacts.trusted_keys=[{pub(keys['trusted'])}]"])
    assert code == 2  # the input file is checked first: bad input
    records = signed.parent / "input.jsonl"
    records.write_text((ROOT / "data" / "kwanzaa_eval.jsonl").read_text().splitlines()[0] + "\n")
    code = cli.main(["generate", "--config", str(tiny_artifact[0]), "--adapter", str(tiny_artifact[1]),
                     "--input", str(records), "--set", f"artifacts.trusted_keys=[{pub(keys['trusted'])}]"])
    assert code == 1 and "unsigned" in capsys.readouterr().err


def test_a_bad_key_file_is_bad_input(signed, tmp_path, capsys):
    (tmp_path / "not-a-key.pub").write_text("hello\n")
    assert cli.main(["verify", str(signed), "--public-key", str(tmp_path / "not-a-key.pub")]) == 2
    assert "not-a-key.pub: not a PEM public key" in capsys.readouterr().err
    assert cli.main(["verify", str(signed), "--public-key", str(tmp_path / "missing.pub")]) == 2
    assert "missing.pub: public key file not found" in capsys.readouterr().err


def test_signing_refuses_a_broken_artifact_and_a_second_signature(signed, keys, capsys):
    assert cli.main(["sign", str(signed), "--private-key", str(keys["trusted"])]) == 2
    assert "already signed" in capsys.readouterr().err
    (signed / "README.md").write_text("# changed\n")
    assert cli.main(["sign", str(signed), "--private-key", str(keys["trusted"]), "--replace"]) == 2
    assert "fails verification" in capsys.readouterr().err


def test_training_signs_in_step_7_and_verifies_in_step_8(tiny_artifact, keys, tmp_path, capsys):
    overrides = (f"artifacts.signing={keys['trusted']}", "evaluation.behavioral=false")
    result = train_adapter(tiny_artifact[0], overrides, output_dir=str(tmp_path))
    artifact = result.artifact_dir
    assert (artifact / "model.sig").is_file()
    metadata = json.loads((artifact / "metadata.json").read_text())
    assert metadata["signing"]["public_key_sha256"] == signing.public_key_fingerprint(pub(keys["trusted"]))
    # No key is left where the artifact's writer could replace it, and the card points to none of theirs.
    left = [p for p in result.run_dir.rglob("*") if p.is_file() and b"-----BEGIN" in p.read_bytes()[:4096]]
    assert left == []
    card = (artifact / "README.md").read_text()
    assert "--public-key PUBLISHER.pub" in card and "out of band" in card and ".pub" not in card.replace(
        "PUBLISHER.pub", "")
    assert cli.main(["verify", str(artifact), "--public-key", pub(keys["trusted"])]) == 0


def test_an_unusable_signing_key_fails_step_1_before_anything_is_written(tiny_artifact, tmp_path, capsys):
    code = cli.main(["train", "--config", str(tiny_artifact[0]), "--output-dir", str(tmp_path / "out"),
                     "--set", f"artifacts.signing={tmp_path / 'no-such-key'}"])
    assert code == 2 and "no-such-key: private key file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
