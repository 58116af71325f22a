"""Any causal LM from a base-model profile: base (4-bit where configured) + verified adapter -> answers.

The adapter is loaded only after `verify` passes on its artifact, and only onto the base model it
was trained on: the base model's digest is computed as training computed it and compared with the
one in the artifact's metadata. Prompts come from `render_record`, the renderer training uses.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.contract import Answer, parse_answer
from kwanzaa_adapter.data.records import Document, RagRecord, render_record
from kwanzaa_adapter.generation.decoding import end_of_turn_ids, generate, sampler
from kwanzaa_adapter.generation.engines import EngineChoice, choose_engine
from kwanzaa_adapter.generation.gate import AnswerabilityGate, GateLogits, decision_label, gate_tap, load_gate
from kwanzaa_adapter.generation.grammar import SchemaGrammar
from kwanzaa_adapter.generation.llamacpp import Row
from kwanzaa_adapter.backend.models.verified import (  # noqa: F401 (re-exported: the backend's adapter checks)
    AdapterInfo,
    BaseModelMismatchError,
    VerifiedArtifact,
    base_digest_as_trained,
    check_base_digest,
    load_base_as_trained,
    verify_adapter_artifact,
)
from kwanzaa_adapter.generation.evidence import EvidenceSelector, answered, finish_answer, load_evidence_selector
from kwanzaa_adapter.modeling.loading import (
    ModelReferenceError,
    load_verified_adapter,
    resolve_device,
    run_precision,
    set_compute_precision,
)

log = logging.getLogger(__name__)


class ModelFamilyError(ModelReferenceError):
    """The base model is not of an architecture the chosen model class serves (exit 2)."""


class PromptTooLongError(ValueError):
    """Prompt plus generation limit exceed the model's context window."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AnswerResult:
    """A contract answer, or why the raw output is not one (the raw output is always kept)."""

    raw_output: str
    answer: Answer | None
    error: str | None
    gate: dict | None = None  # {"decision", "refuse_probability"} when the answerability gate held it

    @classmethod
    def from_output(cls, raw: str, gate: dict | None = None) -> AnswerResult:
        parsed = parse_answer(raw)
        return cls(raw, parsed.answer, parsed.error, gate)

    @property
    def ok(self) -> bool:
        return self.answer is not None

    def to_json(self) -> dict:
        held = {"gate": self.gate} if self.gate is not None else {}
        if self.answer is not None:
            return {"answer": self.answer.model_dump(mode="json", exclude_none=True), "error": None, **held}
        return {"answer": None,
                "error": {"type": "invalid_output", "message": self.error, "raw_output": self.raw_output}, **held}


def gate_verdict(refuse: bool | None, probability: float | None) -> dict | None:
    """What a reply says about the gate's part in it (None: no gate held this answer)."""
    return None if refuse is None else {"decision": decision_label(refuse), "refuse_probability": probability}


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatStream:
    """Text pieces of one chat reply as they are generated; holds the model's lock while iterated.

    After the iteration: `finish_reason` ("stop" at an end-of-turn token, "length" at the limit),
    `prompt_tokens`, `completion_tokens` and `text`.
    """

    def __init__(self, owner: CausalLMModel, messages: Sequence[dict], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, gated: bool = True):
        self.owner, self.max_new_tokens = owner, max_new_tokens
        self.gate = owner.gate if gated else None
        self.gate_result: dict | None = None  # after the iteration, with a gate: its decision
        self.sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
            else {"do_sample": False}
        self.prompt_ids = owner.encode(messages, max_new_tokens)
        self.prompt_tokens, self.completion_tokens = len(self.prompt_ids), 0
        self.finish_reason: str | None = None
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        if self.owner.fast is not None:
            yield from self._fast()
            return
        owner = self.owner
        with owner.lock:
            streamer = TextIteratorStreamer(owner.tokenizer, skip_prompt=True, skip_special_tokens=True)
            cancel, outcome = threading.Event(), {}
            stop_ids = end_of_turn_ids(owner.model, owner.tokenizer)
            ids = torch.tensor([self.prompt_ids], device=owner.device)

            def run() -> None:
                try:
                    with torch.inference_mode(), gate_tap(owner.model, self.gate) as tap:
                        holding = [GateLogits(owner.tokenizer, ids.shape[1], gate=self.gate, tap=tap)] \
                            if self.gate is not None else []
                        outcome["ids"] = owner.model.generate(
                            input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                            max_new_tokens=self.max_new_tokens, eos_token_id=stop_ids, pad_token_id=stop_ids[0],
                            use_cache=True, stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                            logits_processor=LogitsProcessorList(holding), **self.sampling,
                        )[0, len(self.prompt_ids):].tolist()
                    if holding:
                        self.gate_result = gate_verdict(holding[0].refuse[0], holding[0].probabilities[0])
                except BaseException as exc:  # re-raised in the consumer's thread
                    outcome["error"] = exc
                    streamer.end()

            worker = threading.Thread(target=run, name="chat-generate", daemon=True)
            worker.start()
            try:
                for piece in streamer:
                    if piece:
                        self.text += piece
                        yield piece
            finally:
                cancel.set()
                worker.join()
            if "error" in outcome:
                raise outcome["error"]
            new = outcome["ids"]
            stopped = bool(new) and new[-1] in stop_ids
            self.completion_tokens = len(new)
            self.finish_reason = "stop" if stopped or len(new) < self.max_new_tokens else "length"

    def _fast(self) -> Iterator[str]:
        """The same reply from the fast engine, token by token."""
        owner, tokenizer = self.owner, self.owner.tokenizer
        stop_ids = end_of_turn_ids(owner.model, tokenizer)
        row = Row(self.prompt_ids, self.max_new_tokens, gated=self.gate is not None, json_only=False,
                  sample=sampler(self.sampling.get("temperature", 0.0), self.sampling.get("top_p", 1.0)))
        with owner.lock:
            for _, token in owner.fast.decode(tokenizer, [row], stop_ids, self.gate):
                if token is None:
                    raise RuntimeError(f"generation failed after {len(row.tokens)} tokens: {row.error}")
                if token in stop_ids:
                    break
                text = tokenizer.decode(row.tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(self.text):  # whole characters only
                    piece, self.text = text[len(self.text):], text
                    yield piece
        self.gate_result = gate_verdict(row.refuse, row.probability) if self.gate is not None else None
        self.completion_tokens = len(row.tokens)
        self.finish_reason = "stop" if row.stopped or len(row.tokens) < self.max_new_tokens else "length"


# --------------------------------------------------------------------------- the model


class CausalLMModel:
    """A base model from a profile, optionally with a verified adapter, answering in the contract."""

    family = "causal_lm"
    model_types: frozenset[str] | None = None  # accepted `config.model_type`s; None accepts any

    def __init__(self, config: KwanzaaConfig, adapter: str | Path | None = None, *,
                 allow_base_mismatch: bool = False, device: str | None = None,
                 trusted_keys: Sequence[str | Path] = ()):
        self.config = config
        self.device = resolve_device(device or config.training.device)
        # Keys given here and artifacts.trusted_keys: with any, only an adapter one of them signed loads.
        trusted = (*trusted_keys, *config.artifacts.trusted_keys)
        verified = verify_adapter_artifact(adapter, trusted) if adapter is not None else None  # before the base loads
        self.precision = run_precision(config, self.device)
        # The base is loaded as the adapter was trained, so that its digest can prove it is that base;
        # then it computes in the precision this machine runs fast (set_compute_precision).
        loaded_as = (verified.trained_precision if verified else None) or self.precision.resolved
        model, self.tokenizer, self.source, self.base_digest = load_base_as_trained(config, self.device, loaded_as)
        self.check_model_type(model)
        self.adapter: AdapterInfo | None = None
        if adapter is not None:
            self.adapter = check_base_digest(verified, self.base_digest, allow_base_mismatch)
            model = load_verified_adapter(model, adapter, trusted)
        # The gate comes from the verified artifact; gate.apply false leaves the decision to the generation.
        # Both are read once and built from the bytes verification checked (safety.artifacts.sealed).
        self.gate: AnswerabilityGate | None = load_gate(adapter, verified.digests) \
            if adapter is not None and config.gate.apply else None
        # The evidence selector too (evidence.apply none leaves the model's citations and text).
        self.selector: EvidenceSelector | None = load_evidence_selector(adapter, verified.digests) \
            if adapter is not None else None
        if loaded_as != self.precision.resolved:
            set_compute_precision(model, self.precision.dtype)
            log.info("base verified in %s (as trained); computing in %s", loaded_as, self.precision.resolved)
        self.model = model.eval()
        self.lock = threading.Lock()  # one model: generations run one at a time

    @functools.cached_property
    def engine_choice(self) -> EngineChoice:
        """The fast engine (inference.engine) of this verified model, derived when first asked for (eval never asks)."""
        return choose_engine(self.config, self.model, self.tokenizer, base_digest=self.base_digest,
                             with_adapter=self.adapter is not None,
                             gate_layer=self.gate.layer if self.gate is not None else None)

    @property
    def fast(self):
        """The fast engine (`generation.llamacpp.LlamaCppEngine`), or None where the reference generates."""
        return self.engine_choice.llamacpp

    def check_model_type(self, model) -> None:
        model_type = getattr(model.config, "model_type", None)
        if self.model_types is not None and model_type not in self.model_types:
            raise ModelFamilyError(
                f"model.family: '{self.family}' serves {sorted(self.model_types)} models, but "
                f"{self.config.model.name_or_path} is a '{model_type}' model; set model.family: causal_lm"
            )

    @property
    def name(self) -> str:
        """The served model's name: the adapter's run and version, or the base model reference."""
        if self.adapter is not None and self.adapter.run_name:
            return f"{self.adapter.run_name}-v{self.adapter.version}"
        return self.config.model.name_or_path

    def describe(self) -> dict:
        quantization = self.config.quantization
        return {"family": self.family, "base_model": self.config.model.name_or_path,
                "base_digest": self.base_digest, "precision": self.precision.resolved,
                "quantization": f"4-bit {quantization.quant_type}" if quantization.load_in_4bit else "none",
                "adapter": self.adapter.as_json() if self.adapter else None,
                "gate": self.gate.describe() if self.gate is not None else None,
                "evidence": {"selector": self.selector.describe() if self.selector else None,
                             **self.config.evidence.model_dump(exclude={"fit"})},
                "engine": self.engine_choice.describe()}

    # --- answers

    def prompt_for(self, question: str, documents: Sequence[Document]) -> list[dict]:
        """The training renderer's chat turns for a question over documents."""
        record = RagRecord(id="request", question=question, documents=list(documents), expect_refusal=False)
        return render_record(record, self.config.data.system_prompt)

    def answer(self, question: str, documents: Sequence[Document], max_new_tokens: int | None = None) -> AnswerResult:
        prompt = self.prompt_for(question, documents)
        self.encode(prompt, max_new_tokens or self.config.evaluation.max_new_tokens)  # fits the context window
        return self.finish(self.answer_prompts([prompt], max_new_tokens)[0], question, documents)

    def finish(self, result: AnswerResult, question: str, documents: Sequence[Document]) -> AnswerResult:
        """The answer as the product hands it out: the artifact's evidence applied and the grounding checked, as
        `evidence` configures (`generation.evidence.finish_answer`); the raw output is kept."""
        settings = self.config.evidence
        evidence = None
        if self.selector is not None and settings.apply != "none" and answered(result.raw_output):
            with self.lock:  # one reference forward pass reads the question's attention
                evidence = self.selector.select(self.model, self.tokenizer, [self.prompt_for(question, documents)],
                                                [documents])[0]
        finished = finish_answer(result.raw_output, documents, evidence=evidence, mode=settings.apply,
                                 grounding=settings.grounding_check)
        if finished == result.raw_output:
            return result
        parsed = parse_answer(finished)
        return AnswerResult(result.raw_output, parsed.answer, parsed.error, result.gate)

    def encode(self, messages: Sequence[dict], max_new_tokens: int) -> list[int]:
        """Chat-templated prompt ids; PromptTooLongError when they and the answer would not fit."""
        encoded = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        ids = list(encoded["input_ids"])
        window = getattr(self.model.config, "max_position_embeddings", None)
        if window is not None and len(ids) + max_new_tokens > window:
            raise PromptTooLongError(f"the prompt is {len(ids)} tokens and {max_new_tokens} may be generated, "
                                     f"but the model's context window is {window} tokens")
        return ids

    def answer_prompts(self, prompts: Sequence[list[dict]], max_new_tokens: int | None = None,
                       progress: bool = False, constrained: bool | None = None) -> list[AnswerResult]:
        """Batched greedy generation (evaluation settings), each output parsed into the contract;
        `constrained` (default evaluation.constrained_decoding) holds every output to the contract."""
        if constrained is None:
            constrained = self.config.evaluation.constrained_decoding
        if not prompts:
            return []
        with self.lock:
            result = generate(self.model, self.tokenizer, prompts,
                              max_new_tokens=max_new_tokens or self.config.evaluation.max_new_tokens,
                              batch_size=self.config.evaluation.batch_size, progress=progress,
                              grammar=self.contract_grammar if constrained else None, gate=self.gate,
                              llamacpp=self.fast)
        verdicts = [gate_verdict(refuse, p) for refuse, p in zip(result.refuse, result.refuse_probabilities)] \
            if self.gate is not None else [None] * len(prompts)
        return [AnswerResult.from_output(raw, verdict) for raw, verdict in zip(result.outputs, verdicts)]

    @functools.cached_property
    def contract_grammar(self) -> SchemaGrammar:
        """The answer contract as a grammar for this model's tokenizer (constrained decoding)."""
        return SchemaGrammar(self.tokenizer)

    # --- chat

    def stream_chat(self, messages: Sequence[dict], max_new_tokens: int | None = None,
                    temperature: float = 0.0, top_p: float = 1.0, gated: bool = True) -> ChatStream:
        """Stream a reply to chat messages (greedy unless temperature > 0); iterate to generate.
        With the artifact's gate (and `gated`), the gate decides answer or refuse."""
        return ChatStream(self, messages, max_new_tokens or self.config.evaluation.max_new_tokens, temperature,
                          top_p, gated)
