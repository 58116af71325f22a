"""Contract-constrained decoding: the kwanzaa.answer.v1 JSON Schema as a grammar (llguidance).

At each step the grammar says which tokens may come next; every other logit is set to -inf, so
that a finished answer is a valid contract object by construction (compact, keys in the contract's
order, as training renders it). `SchemaGrammar` compiles a schema (the contract's by default, or
a client's `response_format`, under `CLIENT_SCHEMA_LIMITS`) for one tokenizer; `constraint()` hands out
one matcher per answer, a copy of the compiled one.
`ContractLogits` applies them to a batch inside `model.generate` (evaluation, `generate`); the
serving request batcher drives the same constraints through its own per-row bookkeeping.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import torch
from transformers import LogitsProcessor

from kwanzaa_adapter.contract import answer_json_schema

CONSTRAINED_EXTRA_MISSING = "constrained decoding needs llguidance: pip install llguidance"

# llguidance's own bounds on the work a client's schema may cause (`LLParserLimits`): a compilation in a
# thread cannot be stopped from outside, so the parser must stop itself. The grammar's size and the
# lexer's start-up fuel bound the compilation (a few tens of milliseconds at most here, against 1.6 s
# for a 1 MiB schema under llguidance's defaults); lexer states bound its memory; the step limits
# (llguidance's defaults) bound each token's mask. Errors leave the grammar out of the message.
CLIENT_SCHEMA_LIMITS = {"max_grammar_size": 20_000, "initial_lexer_fuel": 200_000, "max_lexer_states": 50_000,
                        "step_lexer_fuel": 200_000, "step_max_items": 50_000, "verbose_errors": False}


class ContractConstraint:
    """One answer's position in the contract grammar."""

    def __init__(self, matcher):
        self.matcher = matcher

    def allowed(self, vocab_size: int) -> torch.BoolTensor:
        """Which of the model's `vocab_size` tokens may come next (rows past the tokenizer's: never)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        known = min(vocab_size, bits.size)
        allowed[:known] = torch.from_numpy(bits[:known].astype(bool))
        return allowed

    def restrict(self, row_scores: torch.FloatTensor) -> torch.FloatTensor:
        """One row of next-token logits with every token the grammar forbids at -inf."""
        allowed = self.allowed(row_scores.shape[-1]).to(row_scores.device)
        return row_scores.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} is outside the contract grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


@functools.lru_cache(maxsize=4)
def _grammar_tokenizer(tokenizer):
    """llguidance's view of a Hugging Face fast tokenizer; about half a second to build, so built once."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer)


class SchemaGrammar:
    """A JSON Schema (by default the answer contract's) compiled for `tokenizer` (a fast HF tokenizer)."""

    def __init__(self, tokenizer, schema: dict | None = None, limits: dict | None = None):
        """`limits`: llguidance `LLParserLimits` fields (`CLIENT_SCHEMA_LIMITS` for a client's schema);
        ValueError when the schema does not compile within them."""
        try:
            import llguidance
        except ImportError:
            raise ImportError(CONSTRAINED_EXTRA_MISSING) from None
        self._tokenizer = _grammar_tokenizer(tokenizer)
        self.schema = schema if schema is not None else answer_json_schema()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(self.schema), defaults={"whitespace_flexible": False})
        parser_limits = llguidance.LLParserLimits(**limits) if limits is not None else None
        self._compiled = llguidance.LLMatcher(self._tokenizer, grammar, limits=parser_limits)
        if self._compiled.is_error():
            raise ValueError(f"the JSON Schema does not compile to a grammar: {self._compiled.get_error()}")

    def constraint(self) -> ContractConstraint:
        """A matcher at the grammar's start: a copy of the compiled one (microseconds, not a recompilation)."""
        return ContractConstraint(self._compiled.deep_copy())


class ContractLogits(LogitsProcessor):
    """Masks each row of a `generate` batch to its grammar; rows advance by the tokens generated since."""

    def __init__(self, grammar: SchemaGrammar, batch_size: int, prompt_length: int, stop_ids: list[int]):
        self.constraints = [grammar.constraint() for _ in range(batch_size)]
        self.prompt_length, self.stop_ids = prompt_length, set(stop_ids)
        self.consumed = [0] * batch_size
        self.ended = [False] * batch_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, constraint in enumerate(self.constraints):
            new = input_ids[row, self.prompt_length + self.consumed[row]:].tolist()
            self.consumed[row] += len(new)
            for token in new:
                if self.ended[row] or token in self.stop_ids:
                    self.ended[row] = True  # after its end a row is padding: nothing more to match
                    break
                constraint.advance(token)
            if not self.ended[row]:
                scores[row] = constraint.restrict(scores[row])
        return scores
