"""Throughput of compute_model_state_checksum against plain hashlib.sha256 over the same bytes.

The state hashed is the real base as training loads it: the packaged SmolLM2-135M-Instruct in
4-bit NF4 (double quant) per configs/demo.yaml, in the precision `model.precision` resolves to on
this CPU, after k-bit preparation (where training takes its baseline). Both sides hash the same
tensors: every base parameter and buffer (packed 4-bit weights, embeddings, norms) and each 4-bit
weight's quantization state.

Usage: python bench/hash_throughput.py [--repeats 3] [--config configs/demo.yaml]
Target: checksum throughput >= 0.8 x hashlib (the per-tensor bookkeeping must not cost more).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from kwanzaa_adapter.backend.models.causal_lm import load_base_as_trained
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.modeling.loading import run_precision
from kwanzaa_adapter.safety.checksums import _base_tensors, _quant_state_parts, compute_model_state_checksum

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TARGET_RATIO = 0.8


def load_base(config_path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The base model as training loads it on the CPU, and what was loaded."""
    config = load_training_config(config_path)
    precision = run_precision(config, "cpu")
    model, _, _, _ = load_base_as_trained(config, "cpu", precision.resolved)
    q = config.quantization
    return model, {"model": config.model.name_or_path, "precision": precision.resolved,
                   "precision_reason": f"{precision.setting}: {precision.reason}",
                   "quantization": f"4-bit {q.quant_type}, double quant {q.double_quant}" if q.load_in_4bit else "none"}


def hashed_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors compute_model_state_checksum hashes, as plain contiguous tensors."""
    tensors = []
    for name, tensor in _base_tensors(model):
        tensors.append(tensor)
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            tensors.extend(part for _, part in _quant_state_parts(name, quant_state))
    return [t.detach().as_subclass(torch.Tensor).contiguous() for t in tensors]


def plain_sha256(tensors: list[torch.Tensor]) -> float:
    """Seconds for hashlib over each tensor's bytes, already laid out contiguously."""
    start = time.perf_counter()
    for t in tensors:
        if t.numel():
            hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy())).hexdigest()
    return time.perf_counter() - start


def best_of(repeats: int, fn) -> float:
    return min(fn() for _ in range(repeats))


def measure(repeats: int = 3, config_path: str | Path = DEMO_CONFIG) -> dict:
    """Checksum and plain hashlib throughput over the base's state; `ratio` = checksum / hashlib speed."""
    model, loaded = load_base(config_path)
    tensors = hashed_tensors(model)
    total_bytes = sum(t.numel() * t.element_size() for t in tensors)
    megabytes = total_bytes / 1e6
    baseline_s = best_of(repeats, lambda: plain_sha256(tensors))
    checksum_s = best_of(repeats, lambda: _timed(lambda: compute_model_state_checksum(model)))
    result = {
        **loaded,
        "bytes": total_bytes,
        "tensors": len(tensors),
        "hashlib_mb_s": round(megabytes / baseline_s, 1),
        "checksum_mb_s": round(megabytes / checksum_s, 1),
        "checksum_s": round(checksum_s, 4),
        "ratio": round(baseline_s / checksum_s, 3),
        "target_ratio": TARGET_RATIO,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    result["meets_target"] = result["ratio"] >= TARGET_RATIO
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="run config whose base model is hashed")
    args = parser.parse_args()

    result = measure(args.repeats, args.config)
    mb = result["bytes"] / 1e6
    print(f"base: {result['model']}, {result['quantization']}, {result['precision']} "
          f"({result['precision_reason']}): {result['tensors']} tensors, {mb:.1f} MB")
    print(f"hashlib.sha256:               {result['hashlib_mb_s']:>9.1f} MB/s")
    print(f"compute_model_state_checksum: {result['checksum_mb_s']:>9.1f} MB/s ({result['checksum_s']} s)")
    print(f"ratio: {result['ratio']:.3f} (target >= {TARGET_RATIO})")
    print(json.dumps(result, sort_keys=True))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
