"""Helpers that tests of several layers share: a served app on a loopback port, a prompt's token ids, an
event collector for the request batcher, a grammar check, a simulated crash during training, and a small
sealed artifact."""

from __future__ import annotations

import queue
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn
from safetensors.torch import save_file
from transformers import TrainerCallback

from kwanzaa_adapter.generation.grammar import SchemaGrammar
from kwanzaa_adapter.safety.artifacts import seal_artifact

DOCUMENT = {"title": "Kwanzaa", "text": "Kwanzaa is celebrated from December 26 to January 1."}


@contextmanager
def running(app):
    """The app under uvicorn on a free loopback port, in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        app.state.batcher.close(0)


def prompt_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


class Collector:
    def __init__(self):
        self.events = queue.Queue()

    def __call__(self, event):
        self.events.put(event)

    def result(self, timeout: float = 120.0) -> tuple[str, str | None, Exception | None]:
        text = ""
        while True:
            event = self.events.get(timeout=timeout)
            if event.kind == "delta":
                text += event.text
            else:
                return text, event.finish_reason, event.error


def inside_grammar(grammar: SchemaGrammar, ids: list[int]) -> bool:
    constraint = grammar.constraint()
    try:
        for token in ids:
            constraint.advance(token)
    except RuntimeError:
        return False
    return True


class CrashAfter(TrainerCallback):
    """Test hook: stops the process's training abruptly once `step` is reached (after its checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt(f"simulated crash after step {state.global_step}")


def write_adapter_weights(path: Path) -> None:
    tensors = {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.arange(16, dtype=torch.float32).reshape(4, 4),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.ones(4, 4, dtype=torch.bfloat16),
    }
    save_file(tensors, str(path))


@pytest.fixture
def sealed_artifact(tmp_path: Path) -> Path:
    """A sealed artifact with every required file and one extra asset in a subdirectory."""
    root = tmp_path / "final_artifact"
    root.mkdir()
    (root / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}\n')
    write_adapter_weights(root / "adapter_model.safetensors")
    (root / "metadata.json").write_text('{"artifact_version": "1.0.0"}\n')
    (root / "training_config.yaml").write_text("run:\n  name: demo\n")
    (root / "training_metrics.json").write_text('{"eval_loss": 1.5}\n')
    (root / "README.md").write_text("---\nlibrary_name: peft\n---\n# Adapter\n![curve](assets/curve.png)\n")
    (root / "assets").mkdir()
    (root / "assets" / "curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    seal_artifact(root)
    return root
