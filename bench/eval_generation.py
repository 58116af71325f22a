"""Tokens/s of batched greedy generation vs one prompt at a time, on eval prompts.

    python bench/eval_generation.py [--model-dir DIR] [--eval-file FILE] [--n 16] [--max-new-tokens 64]

Defaults: the cached conversion of the packaged SmolLM2-135M-Instruct, and data/kwanzaa_eval_records.jsonl
when it exists (synthetic RAG records otherwise). The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from kwanzaa_adapter.data.records import DEFAULT_SYSTEM_PROMPT, Document, RagRecord, render_record
from kwanzaa_adapter.evaluation import generate, load_eval_items

DEFAULT_EVAL_FILE = Path("data/kwanzaa_eval_records.jsonl")
PRINCIPLES = ["Umoja", "Kujichagulia", "Ujima", "Ujamaa", "Nia", "Kuumba", "Imani"]


def default_model_dir() -> Path:
    from kwanzaa_adapter.modeling import convert_gguf, locate_packaged_gguf

    return convert_gguf(locate_packaged_gguf("smollm2-135m-instruct"))


def synthetic_prompts(n: int) -> list[list[dict]]:
    """RAG records of varied length, rendered by the shared renderer."""
    prompts = []
    for i in range(n):
        principle = PRINCIPLES[i % len(PRINCIPLES)]
        documents = [
            Document(title=f"{PRINCIPLES[(i + k) % 7]} notes", text=f"{PRINCIPLES[(i + k) % 7]} is day {(i + k) % 7 + 1} "
                     "of Kwanzaa. " * (1 + (i + k) % 4))
            for k in range(1 + i % 3)
        ]
        record = RagRecord(id=f"s{i}", question=f"What is {principle}?", documents=documents, expect_refusal=False)
        prompts.append(render_record(record, DEFAULT_SYSTEM_PROMPT))
    return prompts


def load_prompts(eval_file: Path, n: int) -> tuple[list[list[dict]], str]:
    if eval_file.is_file():
        return [item.prompt for item in load_eval_items(eval_file, max_examples=n)], str(eval_file)
    return synthetic_prompts(n), "synthetic"


def measure(model_dir: Path | None = None, eval_file: Path = DEFAULT_EVAL_FILE, n: int = 16,
            max_new_tokens: int = 64, batch_size: int = 16, device: str = "cpu") -> dict:
    """Batched and one-at-a-time greedy generation over the same prompts; `speedup` = batched / single tokens/s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = model_dir or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    prompts, source = load_prompts(eval_file, n)
    settings = dict(max_new_tokens=max_new_tokens, progress=False)

    generate(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=2, progress=False)  # warm-up
    batched = generate(model, tokenizer, prompts, batch_size=batch_size, **settings)
    single = generate(model, tokenizer, prompts, batch_size=1, **settings)
    return {
        "model_dir": str(model_dir), "device": device, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "prompts": len(prompts), "source": source,
        "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "batched_tokens": batched.new_tokens, "batched_seconds": round(batched.seconds, 3),
        "batched_tokens_per_second": round(batched.tokens_per_second, 2),
        "single_tokens": single.new_tokens, "single_seconds": round(single.seconds, 3),
        "single_tokens_per_second": round(single.tokens_per_second, 2),
        "speedup": round(batched.tokens_per_second / single.tokens_per_second, 3),
        "identical_outputs": sum(a == b for a, b in zip(batched.token_ids, single.token_ids)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="saved transformers model (default: SmolLM2)")
    parser.add_argument("--eval-file", type=Path, default=DEFAULT_EVAL_FILE)
    parser.add_argument("--n", type=int, default=16, help="number of eval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    r = measure(args.model_dir, args.eval_file, args.n, args.max_new_tokens, args.batch_size, args.device)
    print(f"model {r['model_dir']} on {r['device']} ({r['threads']} threads), {r['prompts']} prompts from {r['source']}")
    print(f"batched (batch {r['batch_size']}): {r['batched_tokens']} tokens in {r['batched_seconds']:.2f}s = "
          f"{r['batched_tokens_per_second']:.1f} tokens/s")
    print(f"one at a time:      {r['single_tokens']} tokens in {r['single_seconds']:.2f}s = "
          f"{r['single_tokens_per_second']:.1f} tokens/s")
    print(f"speed-up: {r['speedup']:.2f}x; identical outputs: {r['identical_outputs']}/{r['prompts']}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
