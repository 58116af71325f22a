"""One conversation -> token ids with labels on the assistant turns only, by the tokenizer's chat template.

Assistant spans come from the tokenizer's own chat template: the tokens between
template(messages[:i], add_generation_prompt=True) and template(messages[:i+1]) are turn i.
Labels cover the turn's content through its end-of-turn token (so the model learns to stop)
and nothing after it (template whitespace). Both prefixes must be token prefixes of the full
conversation; a template for which they are not raises `TemplateError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template does not render conversation prefixes as token prefixes."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere but the assistant turns
    truncated: bool

    @property
    def supervised_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}



def tokenize_conversation(
    messages: Sequence[dict[str, str]], tokenizer, max_seq_length: int | None, *, end_of_turn_id: int | None = None
) -> TokenizedExample:
    """Token ids and labels for one conversation; keeps the first `max_seq_length` tokens.

    `end_of_turn_id` defaults to the tokenizer's eos token (`<|im_end|>` for SmolLM2).
    """
    messages = list(messages)
    eot = tokenizer.eos_token_id if end_of_turn_id is None else end_of_turn_id
    input_ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = _assistant_span(tokenizer, messages, index, input_ids)
        end = _through_end_of_turn(input_ids, start, end, eot)
        labels[start:end] = input_ids[start:end]
    truncated = max_seq_length is not None and len(input_ids) > max_seq_length
    if truncated:
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    return TokenizedExample(input_ids, labels, truncated)


def _render(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"])


def _assistant_span(tokenizer, messages, index: int, input_ids: list[int]) -> tuple[int, int]:
    before = _render(tokenizer, messages[:index], add_generation_prompt=True)
    through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
    for name, prefix in (("the prompt before", before), ("the conversation through", through)):
        if input_ids[: len(prefix)] != prefix:
            raise TemplateError(
                f"chat template is not prefix-stable: {name} messages[{index}] (assistant) does not tokenize "
                "to a prefix of the whole conversation, so assistant tokens cannot be located; use a "
                "template that renders each turn independently"
            )
    if len(through) <= len(before):
        raise TemplateError(f"chat template renders messages[{index}] (assistant) as no tokens")
    return len(before), len(through)


def _through_end_of_turn(input_ids: list[int], start: int, end: int, eot: int | None) -> int:
    """End of the supervised span: just after the turn's last end-of-turn token, if it has one."""
    for position in range(end - 1, start - 1, -1):
        if input_ids[position] == eot:
            return position + 1
    return end
