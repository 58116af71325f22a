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

from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT
from kwanzaa_adapter.data.records import Document, RagRecord, render_record
from kwanzaa_adapter.evaluation.eval_set import load_eval_items
from kwanzaa_adapter.generation.decoding import generate

DEFAULT_EVAL_FILE = Path("data/kwanzaa_eval_records.jsonl")
PRINCIPLES = ["Umoja", "Kujichagulia", "Ujima", "Ujamaa", "Nia", "Kuumba", "Imani"]


def default_model_dir() -> Path:
    from kwanzaa_adapter.modeling.sources import convert_gguf, locate_packaged_gguf

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
            max_new_tokens: int = 64, batch_size: int = 16, device: str = "cpu", model=None, tokenizer=None) -> dict:
    """Batched and one-at-a-time greedy generation over the same prompts; `speedup` = batched / single tokens/s.

    `model` and `tokenizer`: an already loaded model (e.g. a trained 4-bit base + adapter), else the
    model in `model_dir`. An untrained base answers in prose, and evaluation stops a sequence at its
    first token that cannot start a JSON object, so only a model that has learned the contract
    measures decoding rather than prompt processing.
    """
    if model is None:
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
        "model_dir": str(model_dir or type(model).__name__), "device": device, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "prompts": len(prompts), "source": source,
        "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "batched_tokens": batched.new_tokens, "batched_seconds": round(batched.seconds, 3),
        "batched_tokens_per_second": round(batched.tokens_per_second, 2),
        "single_tokens": single.new_tokens, "single_seconds": round(single.seconds, 3),
        "single_tokens_per_second": round(single.tokens_per_second, 2),
        "speedup": round(batched.tokens_per_second / single.tokens_per_second, 3),
        "identical_outputs": sum(a == b for a, b in zip(batched.token_ids, single.token_ids)),
    }


def load_adapter_model(config_path: Path, artifact: Path, device: str = "cpu", overrides: tuple[str, ...] = ()):
    """(model, tokenizer): the verified adapter on its base, loaded as `kwanzaa-adapter eval` loads it."""
    from kwanzaa_adapter.backend.models.factory import model_from_config
    from kwanzaa_adapter.config import load_training_config

    loaded = model_from_config(load_training_config(config_path, overrides), adapter=artifact, device=device)
    return loaded.model, loaded.tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="saved transformers model (default: SmolLM2)")
    parser.add_argument("--eval-file", type=Path, default=DEFAULT_EVAL_FILE)
    parser.add_argument("--n", type=int, default=16, help="number of eval prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--adapter", type=Path, help="a trained artifact: generate with its 4-bit base + adapter")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="run config of --adapter")
    args = parser.parse_args()

    model = tokenizer = None
    if args.adapter is not None:
        model, tokenizer = load_adapter_model(args.config, args.adapter, args.device)
    r = measure(args.model_dir, args.eval_file, args.n, args.max_new_tokens, args.batch_size, args.device,
                model, tokenizer)
    print(f"model {r['model_dir']} on {r['device']} ({r['threads']} threads), {r['prompts']} prompts from {r['source']}")
    print(f"batched (batch {r['batch_size']}): {r['batched_tokens']} tokens in {r['batched_seconds']:.2f}s = "
          f"{r['batched_tokens_per_second']:.1f} tokens/s")
    print(f"one at a time:      {r['single_tokens']} tokens in {r['single_seconds']:.2f}s = "
          f"{r['single_tokens_per_second']:.1f} tokens/s")
    print(f"speed-up: {r['speedup']:.2f}x; identical outputs: {r['identical_outputs']}/{r['prompts']}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
