"""Trust anchors out of the attacker's reach (safety/anchors.py): whoever can rewrite a run directory
replaces the weights, makes a key pair, re-signs and leaves the new public key beside the artifact. A
key taken from there is refused however it is handed over (its path, a symlink to it, a copy of it), by
`verify --public-key` and by the backend's `--trusted-key`, while the publisher's own key, kept
elsewhere, verifies the untouched artifact and refuses the forged one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from kwanzaa_adapter import cli
from kwanzaa_adapter.safety import anchors, signing
from kwanzaa_adapter.safety.artifacts import seal_artifact
from reliability.signatures import backend_inputs, build_anchor_cases, make_keys
from tiny_artifact import tiny_artifact  # noqa: F401

REFUSED = "refused as a trusted key"


@pytest.fixture(scope="module")
def publisher(tmp_path_factory) -> Path:
    """The publisher's key pair, kept outside every run directory (the public half is `publisher.pub`)."""
    return make_keys(tmp_path_factory.mktemp("publisher-keys"))["trusted"]


@pytest.fixture
def run(tiny_artifact, publisher, tmp_path) -> Path:
    """A run directory of its own holding a published artifact the publisher signed."""
    run = tmp_path / "outputs" / "run"
    run.mkdir(parents=True)
    shutil.copyfile(tiny_artifact[1].parent / anchors.RUN_MARKER, run / anchors.RUN_MARKER)
    shutil.copytree(tiny_artifact[1], run / "final_artifact")
    signing.sign_artifact(run / "final_artifact", publisher)
    return run


def forge(artifact: Path, key_dir: Path) -> Path:
    """The attack: other weights, checksums recomputed, a new key pair in `key_dir`, signed anew with it;
    returns the attacker's public key."""
    weights = artifact / "adapter_model.safetensors"
    tensors = {name: tensor + 0.5 for name, tensor in load_file(weights).items()}
    save_file(tensors, weights)
    key_dir.mkdir(parents=True, exist_ok=True)
    assert cli.main(["keygen", str(key_dir / "signing_key")]) == 0
    seal_artifact(artifact)  # checksums that list the new files, key files included where they lie inside
    assert cli.main(["sign", str(artifact), "--private-key", str(key_dir / "signing_key"), "--replace"]) == 0
    return key_dir / "signing_key.pub"


def test_the_publishers_key_kept_elsewhere_verifies_and_catches_the_forgery(run, publisher, capsys):
    artifact = run / "final_artifact"
    assert cli.main(["verify", str(artifact), "--public-key", f"{publisher}.pub"]) == 0
    forge(artifact, run)
    assert cli.main(["verify", str(artifact), "--public-key", f"{publisher}.pub"]) == 1
    assert "signed by an untrusted key" in capsys.readouterr().out


@pytest.mark.parametrize("where, why", [
    ("run directory", "it lies inside the artifact's run directory"),
    ("artifact", "it lies inside the artifact ("),
    ("symlink from outside", "it lies inside the artifact's run directory"),  # by the path it resolves to
    ("copy outside", "it is the same key as"),
    ("private half copied outside", "it is the same key as"),
])
def test_a_key_from_the_artifact_or_its_run_directory_is_refused(run, tmp_path, capsys, where, why):
    artifact = run / "final_artifact"
    key_dir = artifact if where == "artifact" else run
    forged_key = forge(artifact, key_dir)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    offered = {"symlink from outside": outside / "link.pub", "copy outside": outside / "copy.pub",
               "private half copied outside": outside / "derived.pub"}.get(where, forged_key)
    if where == "symlink from outside":
        offered.symlink_to(forged_key)
    elif where == "copy outside":
        shutil.copyfile(forged_key, offered)
    elif where == "private half copied outside":  # only the private key is left there: the same key still
        with signing.public_half(key_dir / "signing_key") as public:
            shutil.copyfile(public, offered)
        forged_key.unlink()
    capsys.readouterr()
    assert cli.main(["verify", str(artifact), "--public-key", str(offered)]) == 2
    err = capsys.readouterr().err
    assert REFUSED in err and why in err and "out of band" in err and "Traceback" not in err


def test_the_backend_refuses_a_key_from_the_run_directory_before_loading(run, tiny_artifact, tmp_path, capsys,
                                                                          monkeypatch):
    artifact = run / "final_artifact"
    forged_key = forge(artifact, run)
    config, records = backend_inputs(tmp_path)
    loaded = []
    monkeypatch.setattr("kwanzaa_adapter.backend.models.causal_lm.load_base_as_trained",
                        lambda *a, **k: loaded.append(a) or pytest.fail("the base model loaded"))
    code = cli.main(["generate", "--config", str(config), "--adapter", str(artifact), "--input", str(records),
                     "--trusted-key", str(forged_key)])
    assert code == 2 and REFUSED in capsys.readouterr().err and loaded == []


def test_the_reliability_benchs_anchor_cases_are_each_refused_for_their_reason(tmp_path, capsys, monkeypatch):
    """bench/reliability.py's `key_inside_artifact_refused` runs these as subprocesses; here, in process."""
    monkeypatch.setattr("kwanzaa_adapter.backend.models.causal_lm.load_base_as_trained",
                        lambda *a, **k: pytest.fail("the base model loaded"))
    cases = build_anchor_cases(tmp_path)
    assert len(cases) == 6
    failures = []
    for case in cases:
        code = cli.main(list(case.argv))
        out, err = capsys.readouterr()
        if code != case.expected_exit or "Traceback" in out + err or not case.gives_reason(err):
            failures.append(f"{case.name}: exit {code}, {(err or out)[-300:]!r}")
    assert failures == []


@pytest.mark.parametrize("padding", ["before", "after"])
def test_a_copy_padded_past_any_size_is_still_found(run, tmp_path, capsys, padding):
    """A copy of the key left in the run directory behind (or before) a megabyte of padding is the same key."""
    artifact = run / "final_artifact"
    forged_key = forge(artifact, tmp_path / "attacker")
    pad = b"# " + b"x" * (3 << 19) + b"\n"
    key = forged_key.read_bytes()
    (run / "notes.txt").write_bytes(pad + key if padding == "before" else key + pad)
    capsys.readouterr()
    assert cli.main(["verify", str(artifact), "--public-key", str(forged_key)]) == 2
    err = capsys.readouterr().err
    assert "it is the same key as" in err and "notes.txt" in err


def test_a_run_directory_too_large_to_search_refuses_every_key(run, publisher, capsys, monkeypatch):
    monkeypatch.setattr(anchors, "MAX_SCANNED_FILES", 20)
    for index in range(21):
        (run / f"padding-{index}.txt").write_text("nothing\n")
    capsys.readouterr()
    assert cli.main(["verify", str(run / "final_artifact"), "--public-key", f"{publisher}.pub"]) == 2
    err = capsys.readouterr().err
    assert "cannot be completed" in err and "Traceback" not in err
