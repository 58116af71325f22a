"""What bench/gpu_check.py builds and reads: random-weight models of real shapes, their run configs, rows
of an exact length, and peak memory.

Nothing is downloaded: a shape is a transformers config written out here, its weights are seeded random
numbers, and it is saved with SmolLM2's tokenizer, so the project loads it as it loads any local model.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import torch
import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Real shapes, written out (no network to fetch a config); tests compare them with the shipped profiles.
SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                "tie_word_embeddings": True, "max_position_embeddings": 8192}
# OLMo-7B: 50280 tokenizer ids in an embedding padded to 50304 rows.
OLMO_7B = {"model_type": "olmo", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 50304,
           "tie_word_embeddings": False, "max_position_embeddings": 2048}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # SmolLM2's <|im_start|>, <|im_end|>


def shape_config(shape: dict, tiny: bool, vocab_size: int):
    """A transformers config of `shape`, or of its tiny version (2 layers, width 64) over `vocab_size` ids."""
    from transformers import AutoConfig

    values = {**shape, **TOKEN_IDS, **(TINY | {"vocab_size": vocab_size} if tiny else {})}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def save_random_model(config, tokenizer, directory: Path, device: str) -> Path:
    """Seeded random weights of `config`, made on `device` and saved with the tokenizer for from_pretrained."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    release(device)
    return directory


def load_tokenizer(directory: Path | None):
    """SmolLM2's tokenizer: from `directory` (the GPU machine's copy), else read from the packaged GGUF file."""
    from transformers import AutoTokenizer

    if directory is not None:
        return AutoTokenizer.from_pretrained(directory)
    from kwanzaa_adapter.modeling.sources import locate_packaged_gguf

    gguf = locate_packaged_gguf("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def write_run_config(work: Path, name: str, model_profile: str, model_dir: Path, **sections) -> Path:
    """configs/training.yaml, the GPU run, on `model_dir` with `sections` merged over its own; in `work`."""
    config = yaml.safe_load((CONFIGS / "training.yaml").read_text())
    config["adapter_profile"] = str(CONFIGS / config["adapter_profile"])
    config["model_profile"] = str(CONFIGS / "models" / model_profile)
    # The model's own config gives its shape: the profile declares the real model's.
    sections["model"] = {"name_or_path": str(model_dir), "architecture": None, **sections.get("model", {})}
    sections["run"] = {"name": name, "output_dir": str(work / "outputs")}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rows_of_length(features: list[dict], length: int, count: int) -> list[dict]:
    """`count` rows of exactly `length` tokens cut from the tokenized conversations laid end to end; their
    labels kept, so the supervised share (and the logits computed) is the data's."""
    if not any(feature["input_ids"] for feature in features):
        raise ValueError("no tokenized training rows to cut rows from")
    ids: list[int] = []
    labels: list[int] = []
    while len(ids) < length * count:
        for feature in features:
            ids += feature["input_ids"]
            labels += feature["labels"]
    return [{"input_ids": ids[i * length:(i + 1) * length], "labels": labels[i * length:(i + 1) * length]}
            for i in range(count)]


def release(device: str) -> None:
    """Free what the last model, trainer or stage left on the GPU (a full collection costs 0.4 s: CUDA only)."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM to the current resident set
            Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: str) -> int:
    """Peak since reset_peak: torch.cuda.max_memory_allocated, or the process's peak RSS (VmHWM) on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")
