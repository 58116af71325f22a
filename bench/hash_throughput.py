"""Throughput of compute_model_state_checksum against plain hashlib.sha256 over the same bytes.

Usage: python bench/hash_throughput.py [--mb 200] [--repeats 3]
Target: checksum throughput >= 0.8 x hashlib (the per-tensor bookkeeping must not cost more).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time

import torch

from kwanzaa_adapter.verification import compute_model_state_checksum


def build_model(total_mb: int) -> torch.nn.Module:
    """Linear layers of 1024x1024 fp32 (4 MiB each) plus a bf16 and a non-contiguous tensor."""
    torch.manual_seed(0)
    n_layers = max(1, total_mb // 4 - 2)
    model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=False) for _ in range(n_layers)))
    model.register_buffer("bf16_table", torch.randn(1024, 1024, dtype=torch.bfloat16))
    model.register_buffer("transposed", torch.randn(1024, 1024).t())
    return model.requires_grad_(False)


def plain_sha256(tensors: list[torch.Tensor]) -> float:
    """Seconds for hashlib over each tensor's bytes, already laid out contiguously."""
    start = time.perf_counter()
    for t in tensors:
        hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy())).hexdigest()
    return time.perf_counter() - start


def best_of(repeats: int, fn) -> float:
    return min(fn() for _ in range(repeats))


def bench_4bit() -> dict:
    """Checksum time of a tiny 4-bit NF4 (double-quant) Llama loaded on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(
            tmp,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            device_map={"": "cpu"},
        )
    start = time.perf_counter()
    checksums = compute_model_state_checksum(model)
    seconds = time.perf_counter() - start
    return {"tensors": len(checksums["tensors"]), "seconds": round(seconds, 4)}


def measure(mb: int = 200, repeats: int = 3) -> dict:
    """Checksum and plain hashlib throughput over the same tensors; `ratio` = checksum / hashlib speed."""
    model = build_model(mb)
    tensors = [t.detach().contiguous() for t in [*model.parameters(), *model.buffers()]]
    total_bytes = sum(t.numel() * t.element_size() for t in tensors)
    megabytes = total_bytes / 1e6
    baseline_s = best_of(repeats, lambda: plain_sha256(tensors))
    checksum_s = best_of(repeats, lambda: _timed(lambda: compute_model_state_checksum(model)))
    result = {
        "bytes": total_bytes,
        "tensors": len(tensors),
        "hashlib_mb_s": round(megabytes / baseline_s, 1),
        "checksum_mb_s": round(megabytes / checksum_s, 1),
        "ratio": round(baseline_s / checksum_s, 3),
        "target_ratio": 0.8,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    result["meets_target"] = result["ratio"] >= result["target_ratio"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="approximate size of the tensors, MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-4bit", action="store_true")
    args = parser.parse_args()

    result = measure(args.mb, args.repeats)
    mb = result["bytes"] / 1e6
    print(f"hashlib.sha256:               {result['hashlib_mb_s']:>9.1f} MB/s over {mb:.0f} MB")
    print(f"compute_model_state_checksum: {result['checksum_mb_s']:>9.1f} MB/s ({result['tensors']} tensors)")
    print(f"ratio: {result['ratio']:.3f} (target >= 0.8)")
    if not args.skip_4bit:
        result["nf4_tiny"] = bench_4bit()
        nf4 = result["nf4_tiny"]
        print(f"4-bit tiny model: {nf4['tensors']} entries in {nf4['seconds']} s")
    print(json.dumps(result, sort_keys=True))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
