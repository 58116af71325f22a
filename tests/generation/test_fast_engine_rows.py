"""Continuous batching on the fast engine: rows that join a running batch, rows that part, a row that fails.

Rows of one prompt share one KV sequence while they choose the same tokens; each needs a sequence of its own
when it parts. A batch whose sequences were all handed to joining rows had none left for a parting row, and
the whole batch failed; one row's failure (its grammar, its sampler) must end that row only.
"""

from __future__ import annotations

import pytest

from kwanzaa_adapter.generation.llamacpp import LlamaCppEngine, Row
from kwanzaa_adapter.modeling.derived import derived_gguf
from tests.generation.test_fast_engine import _adapted, _ids, _prompts

pytest.importorskip("llama_cpp", reason="the llama.cpp engine is built by `make setup`")


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    path, _ = derived_gguf(_adapted(tokenizer), tokenizer, base_digest="tiny", with_adapter=True, quant="f16",
                           cache_dir=tmp_path_factory.mktemp("fast-cache"))
    return LlamaCppEngine(path)


def _decode(engine, tokenizer, rows: list[Row], joining: list[list[Row]], room: tuple[int, int, int]):
    """Decode `rows`, offering the next group of `joining` at each step (as many as fit); the failed rows."""
    offered, failed = list(joining), []

    def join(free: int, fits) -> list[Row]:
        if not offered or len(offered[0]) > free:
            return []
        return offered.pop(0)

    for index, token in engine.decode(tokenizer, rows, [tokenizer.eos_token_id], join=join, room=room):
        if token is None:
            failed.append(index)
    return failed


def _alone(engine, tokenizer, prompt: list[int], limit: int) -> list[int]:
    row = Row(prompt, limit, json_only=False)
    for _ in engine.decode(tokenizer, [row], [tokenizer.eos_token_id]):
        pass
    return row.tokens


def test_rows_that_part_after_joins_filled_the_sequences_get_their_own(engine, tokenizer):
    """Two identical requests with different limits join and share one sequence; a third request would take
    the last free sequence, which the follower needs when its leader stops. It waits until a sequence is
    free; every row decodes the tokens it decodes alone."""
    first, second, third = (_ids(tokenizer, prompt) for prompt in _prompts())
    rows = [Row(first, 24, json_only=False)]
    pair = [Row(second, 3, json_only=False), Row(second, 12, json_only=False)]
    late = [Row(third, 6, json_only=False)]
    room = (3, max(len(p) for p in (first, second, third)) + 24, max(len(p) for p in (first, second, third)))
    assert _decode(engine, tokenizer, rows, [pair, late], room) == []
    assert len(rows) == 4
    assert [row.tokens for row in rows] == [_alone(engine, tokenizer, first, 24), _alone(engine, tokenizer, second, 3),
                                            _alone(engine, tokenizer, second, 12), _alone(engine, tokenizer, third, 6)]


def test_a_row_that_fails_ends_alone_and_the_others_finish(engine, tokenizer):
    first, second, _ = (_ids(tokenizer, prompt) for prompt in _prompts())
    steps = []

    def breaks_at_the_fourth_token(scores):
        steps.append(1)
        if len(steps) == 4:
            raise RuntimeError("grammar step limit")
        return int(scores.argmax())

    rows = [Row(first, 10, json_only=False), Row(second, 10, json_only=False, sample=breaks_at_the_fourth_token),
            Row(second, 10, json_only=False)]
    failed = _decode(engine, tokenizer, rows, [], (3, max(map(len, (first, second))) + 10, len(first) + len(second)))
    assert failed == [1] and str(rows[1].error) == "grammar step limit" and len(rows[1].tokens) == 3
    assert rows[0].tokens == _alone(engine, tokenizer, first, 10)
    assert rows[2].tokens == _alone(engine, tokenizer, second, 10)
