"""The fast engine's trust cases, counted by bench/reliability.py (and proven one by one under tests/generation
and tests/backend): the weights that answer are the weights that were verified, and one row fails alone.

- `derived_swap_refused`: the base's GGUF copied over the adapter's cache entry, its record's sha256
  rewritten to match; refused (`inference.engine: llama.cpp`) and rebuilt (`auto`): 2 when both hold.
- `stale_derived_reused`: an adapter with the same tensors and another `lora_alpha` given the cached entry
  of the first (0 when the key tells them apart).
- `batch_failures_from_one_row`: rows of a continuous batch that failed because of another row (two
  identical requests with different limits after joins filled the sequences; a row whose sampler raises).
- `gate_swap_refused`: a gate swapped, or removed, while the adapter loads; 2 when both are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import build_tiny_model, write_run_config


def _tokenizer():
    from transformers import AutoTokenizer

    from conftest import packaged_gguf_path

    gguf = packaged_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _adapted(tokenizer, alpha: int = 8):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    base = build_tiny_model("llama", len(tokenizer))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False)).eval()


def derived_cases(root: Path, model_dir: Path) -> dict[str, int]:
    from kwanzaa_adapter.config import load_training_config
    from kwanzaa_adapter.generation.engines import choose_engine
    from kwanzaa_adapter.modeling.derived import DERIVED_RECORD, DerivationError, derived_gguf
    from kwanzaa_adapter.safety.artifacts import sha256_file

    tokenizer, cache = _tokenizer(), root / "derived-cache"
    adapted = _adapted(tokenizer)
    options = dict(base_digest="tiny", quant="f16", cache_dir=cache)
    refused = 0
    path, _ = derived_gguf(adapted, tokenizer, with_adapter=True, **options)
    genuine = sha256_file(path)[0]
    base, _ = derived_gguf(adapted, tokenizer, with_adapter=False, **options)
    for engine in ("llama.cpp", "auto"):  # the same swap each time
        path.write_bytes(base.read_bytes())
        record = json.loads((path.parent / DERIVED_RECORD).read_text())
        record["gguf_sha256"] = sha256_file(path)[0]
        (path.parent / DERIVED_RECORD).write_text(json.dumps(record))
        config = load_training_config(write_run_config(root, model_dir, name=f"swap-{engine}.yaml",
                                                       inference={"engine": engine, "cache_dir": str(cache)}))
        try:
            choice = choose_engine(config, adapted, tokenizer, base_digest="tiny", with_adapter=True)
        except DerivationError:
            refused += engine == "llama.cpp"
            continue
        refused += engine == "auto" and choice.llamacpp is not None and sha256_file(path)[0] == genuine
        if choice.llamacpp is not None:
            choice.llamacpp.close()
    first = derived_gguf(_adapted(tokenizer, 8), tokenizer, with_adapter=True, **options)[0]
    other = derived_gguf(_adapted(tokenizer, 16), tokenizer, with_adapter=True, **options)[0]
    return {"derived_swap_refused": refused, "stale_derived_reused": int(first == other)}


def batch_failures_from_one_row(root: Path) -> int:
    from kwanzaa_adapter.generation.llamacpp import LlamaCppEngine, Row
    from kwanzaa_adapter.modeling.derived import derived_gguf

    tokenizer = _tokenizer()
    path, _ = derived_gguf(_adapted(tokenizer), tokenizer, base_digest="tiny", with_adapter=True, quant="f16",
                           cache_dir=root / "rows-cache")
    engine = LlamaCppEngine(path)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=True)["input_ids"])
               for q in ("When is Kwanzaa?", "What does ujima mean?", "Who lit the kinara?")]
    longest = max(map(len, prompts))
    failed_others = 0

    def breaks(scores):
        raise RuntimeError("this row's own failure")

    cases = [  # (first rows, groups offered to join, rows allowed to fail)
        ([Row(prompts[0], 24, json_only=False)],
         [[Row(prompts[1], 3, json_only=False), Row(prompts[1], 12, json_only=False)],
          [Row(prompts[2], 6, json_only=False)]], set()),
        ([Row(prompts[0], 10, json_only=False), Row(prompts[1], 10, json_only=False, sample=breaks),
          Row(prompts[1], 10, json_only=False)], [], {1}),
    ]
    for rows, offered, may_fail in cases:
        offered = list(offered)
        try:
            for index, token in engine.decode(tokenizer, rows, [tokenizer.eos_token_id], room=(3, longest + 24, longest),
                                              join=lambda free, fits: offered.pop(0) if offered and len(offered[0]) <= free
                                              else []):
                failed_others += token is None and index not in may_fail
        except Exception:  # noqa: BLE001 - the whole batch failed: every other row with it
            failed_others += len(rows) - len(may_fail)
    engine.close()
    return failed_others


def gate_swap_refused(root: Path, model_dir: Path) -> int:
    from peft import PeftModel

    from kwanzaa_adapter.backend.models import model_from_config
    from kwanzaa_adapter.config import load_training_config
    from kwanzaa_adapter.generation.gate import GATE_FILE, AnswerabilityGate
    from kwanzaa_adapter.safety.artifacts import SealedFileChangedError, seal_artifact
    from kwanzaa_adapter.training.workflow import train_adapter

    (root / "gate-run").mkdir(parents=True, exist_ok=True)
    config = write_run_config(root / "gate-run", model_dir, train_rows=4, eval_rows=2,
                              training={"max_steps": 2, "per_device_batch_size": 2}, checkpointing={"save_steps": 2},
                              evaluation={"eval_steps": 2, "max_new_tokens": 4})
    artifact = train_adapter(config).artifact_dir
    AnswerabilityGate(1, -1.0, torch.ones(64), torch.zeros(1), torch.zeros(64), torch.ones(64),
                      {"calibration_auc": 0.5}).save(artifact / GATE_FILE)
    seal_artifact(artifact)
    original, refused = PeftModel.from_pretrained.__func__, 0
    for attack in ("swapped", "removed"):
        copy = root / f"gate-{attack}" / "final_artifact"
        shutil.copytree(artifact, copy)

        def swap_then_load(cls, *args, attack=attack, copy=copy, **kwargs):
            if attack == "removed":
                (copy / GATE_FILE).unlink()
            else:
                AnswerabilityGate(1, 2.0, torch.zeros(64), torch.zeros(1), torch.zeros(64), torch.ones(64),
                                  {}).save(copy / GATE_FILE)
            return original(cls, *args, **kwargs)

        PeftModel.from_pretrained = classmethod(swap_then_load)
        try:
            model_from_config(load_training_config(config), adapter=copy)
        except SealedFileChangedError:
            refused += 1
        finally:
            PeftModel.from_pretrained = classmethod(original)
    return refused
