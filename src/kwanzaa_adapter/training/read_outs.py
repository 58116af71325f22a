"""Step 5, after supervised training: the read-outs of the adapted model, fitted on one pass over the decision
examples: the answerability gate (block outputs at the prompt's end, `gate_fitting`) and the evidence selector
(the question's attention to each sentence, `evidence_fitting`). The pass stops after the deepest block either
needs, so the selector adds no forward pass to the gate's."""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.generation.evidence import EvidenceSelector, read_for_evidence
from kwanzaa_adapter.generation.reading import ReadPrompt, read_prompts
from kwanzaa_adapter.training.evidence_fitting import evidence_data, fit_evidence_selector
from kwanzaa_adapter.training.gate_fitting import GateFit, candidate_layers, fit_gate, load_decision_data, question_group

log = logging.getLogger(__name__)


def evidence_depth(config: KwanzaaConfig, blocks: int) -> int:
    """The blocks the selector reads, 1..depth: `evidence.depth`, or with auto the gate's deepest candidate (the
    pass reads no further for the gate), a number the model has at most."""
    setting = config.evidence.depth
    return min(blocks, max(candidate_layers(config.gate.layers, blocks)) if setting == "auto" else setting)


def fit_read_outs(model, tokenizer, config: KwanzaaConfig,
                  progress: bool = True) -> tuple[GateFit | None, EvidenceSelector | None]:
    """(gate, selector), each fitted where `gate.fit` / `evidence.fit` ask for it, from one reading pass."""
    if not (config.gate.fit or config.evidence.fit):
        return None, None
    started = time.perf_counter()
    data = load_decision_data(config)
    blocks = model.config.num_hidden_layers
    layers = candidate_layers(config.gate.layers, blocks) if config.gate.fit else []
    depth = evidence_depth(config, blocks) if config.evidence.fit else None
    found, prompts = [], []
    for item in data.items:
        if depth:
            cands, read = read_for_evidence(tokenizer, item.prompt, item.example.documents)
        else:
            ids = tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
            cands, read = [], ReadPrompt(list(ids), [], [])
        found.append(cands)
        prompts.append(read)
    with tqdm(total=len(prompts), desc="decision features", unit="prompt", disable=not progress) as bar:
        reading = read_prompts(model, tokenizer, prompts, depth=depth, layers=layers,
                               batch_size=config.gate.batch_size, progress=bar.update)
    seconds = time.perf_counter() - started
    tokens = sum(len(p.ids) for p in prompts)
    gate = fit_gate(reading.block_outputs, data, config, feature_seconds=seconds, tokens=tokens) \
        if config.gate.fit else None
    selector = None
    if depth:
        groups = [question_group(item.id) for item in data.items]
        selector = fit_evidence_selector(evidence_data(data.items, found, reading.attention, groups), depth,
                                         folds=config.gate.folds)
        selector.info["seconds"] = round(time.perf_counter() - started, 1)
    log.info("read-outs fitted in %.0f s (one pass over %d decision examples, %d prompt tokens)",
             time.perf_counter() - started, len(prompts), tokens)
    return gate, selector
