"""One forward pass per prompt for bench/decision.py: every block's output at two positions, and the
generation's own refusal probability, teacher-forced.

Each prompt is followed by the fixed opening of every contract answer (`{"version":...,"text":"`)
and by the refusal opening ("The documents do not"). From that one pass:

- `end`: each tapped block's output at the prompt's last token (what the shipped gate reads);
- `prefix`: each tapped block's output at the last token of the answer's fixed opening;
- the probability that the text goes on with the refusal opening (the generation's own score).

The sequences are left-padded, and prompt and suffix are tokenized apart, so every row's positions
sit at the same distance from the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kwanzaa_adapter.evaluation.eval_set import EvalItem
from kwanzaa_adapter.generation.gate import decoder_layers

ANSWER_OPENING = '{"version":"kwanzaa.answer.v1","answer":{"text":"'
POSITIONS = ("end", "prefix")


@dataclass
class Scan:
    features: dict[tuple[int, str], np.ndarray]  # (block, position) -> items x hidden
    refusal_probability: np.ndarray  # items


def suffix_ids(tokenizer, refusal_opening: str) -> tuple[list[int], int]:
    """The suffix's ids and how many of them are the answer's fixed opening."""
    head = tokenizer(ANSWER_OPENING, add_special_tokens=False)["input_ids"]
    full = tokenizer(ANSWER_OPENING + refusal_opening, add_special_tokens=False)["input_ids"]
    if full[: len(head)] != head:
        raise ValueError("the refusal opening merges with the answer's opening into one token")
    return full, len(head)


@torch.no_grad()
def scan(model, tokenizer, items: Sequence[EvalItem], layers: Sequence[int], refusal_opening: str,
         batch_size: int = 8, label: str = "scan") -> Scan:
    full, head = suffix_ids(tokenizer, refusal_opening)
    forced = torch.tensor(full[head:])
    end_at, prefix_at = -(len(full) + 1), -(len(full) - head + 1)
    prompts = [list(tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
               for item in items]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def tap(layer):
        def keep(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden[:, [end_at, prefix_at], :].float().cpu()
        return keep

    handles = [blocks[layer - 1].register_forward_hook(tap(layer)) for layer in layers]
    parts: dict[tuple[int, str], list] = {(layer, p): [] for layer in layers for p in POSITIONS}
    probabilities = []
    try:
        for first in tqdm(range(0, len(order), batch_size), desc=label, unit="batch"):
            rows = [prompts[i] + full for i in order[first: first + batch_size]]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=len(forced) + 1).logits[:, :-1].float()
            log_probs = logits.log_softmax(-1).cpu().gather(-1, forced.expand(len(rows), -1)[..., None]).squeeze(-1)
            probabilities.append(log_probs.sum(-1).exp())
            for layer in layers:
                for index, position in enumerate(POSITIONS):
                    parts[(layer, position)].append(captured[layer][:, index])
    finally:
        for handle in handles:
            handle.remove()
    inverse = np.empty(len(order), dtype=int)
    inverse[order] = np.arange(len(order))
    features = {key: torch.cat(chunks).numpy()[inverse] for key, chunks in parts.items()}
    return Scan(features, torch.cat(probabilities).numpy()[inverse])
