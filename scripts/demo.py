"""`make demo`: train the CPU demo adapter end to end, verify it, and print its summary and wall time."""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kwanzaa_adapter.cli import main as cli


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def backend_check(config: str, artifact: Path) -> int:
    """The backend path on the new artifact: answer one held-out record; refuse a tampered copy."""
    records = Path("data/kwanzaa_eval_records.jsonl").read_text(encoding="utf-8").splitlines()
    held_out = next(line for line in records if not json.loads(line)["expect_refusal"])
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.jsonl"
        record.write_text(held_out + "\n", encoding="utf-8")
        command = ["generate", "--config", config, "--adapter", str(artifact), "--input", str(record)]
        print(f"\n$ kwanzaa-adapter {' '.join(command)}")
        if cli(command):
            return 1
        tampered = Path(tmp) / "tampered"
        shutil.copytree(artifact, tampered)
        weights = tampered / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        weights.write_bytes(bytes(data))
        command[4] = str(tampered)
        print(f"\n$ kwanzaa-adapter {' '.join(command)}   # one byte of the weights flipped")
        code = cli(command)
        print(f"exit code {code}")
        return 0 if code == 1 else 1


def run(config: str = "configs/demo.yaml") -> int:
    from kwanzaa_adapter.train_adapter import train_adapter

    started = time.perf_counter()
    result = train_adapter(config)
    wall = time.perf_counter() - started
    print(f"\nartifact v{result.version} published at {result.artifact_dir}")
    for step in (["verify", str(result.artifact_dir)], ["info", str(result.artifact_dir)]):
        print(f"\n$ kwanzaa-adapter {' '.join(step)}")
        code = cli(step)
        if code:
            return code
    if backend_check(config, result.artifact_dir):
        print("the backend check failed", file=sys.stderr)
        return 1
    if result.behavior is not None:
        print("\nbehavioral metrics on the eval split, base model vs adapter:")
        print(result.behavior.table())
        for label, speed in result.behavior.generation_tokens_per_second().items():
            print(f"generation ({label}): {speed:.1f} tokens/s")
    s = result.summary
    print(f"\ndemo main job wall time: {wall / 60:.1f} min ({wall:.0f} s); peak RSS {peak_rss_mib():.0f} MiB; "
          f"train tokens/s {s.get('mean_tokens_per_second') or 0:.0f}; final eval loss {s.get('final_eval_loss'):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run(*sys.argv[1:]))
