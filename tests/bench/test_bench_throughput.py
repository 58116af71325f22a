"""The pure parts of bench/throughput.py: the FLOP formula, token counting, the table and the JSON line.

No test here trains anything; the benchmark itself is `python bench/throughput.py`.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, load_script

BENCH = ROOT / "bench" / "throughput.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH, "bench_throughput")


def side(bench, tokens: int, seconds: float, rss: float, loss: float) -> dict:
    flops_inputs = dict(block_linear_params=1000, lora_params=10, layers=2, hidden=8, vocab=16,
                        real_tokens=tokens, supervised_tokens=tokens // 4, sum_squared_lengths=tokens * 100)
    return {"train_seconds": seconds, "wall_seconds": seconds + 5, "peak_rss_mb": rss, "final_loss": loss,
            "train_loss": loss, "real_tokens": tokens, "supervised_tokens": tokens // 4, "steps": 3,
            "flops_inputs": flops_inputs}


def test_training_flops_counts_frozen_base_lora_head_and_causal_attention(bench):
    flops = bench.training_flops(block_linear_params=100, lora_params=10, layers=2, hidden=4, vocab=50,
                                 real_tokens=7, supervised_tokens=3, sum_squared_lengths=49)
    assert flops == (4 * 100 + 6 * 10) * 7 + 4 * 50 * 4 * 3 + 6 * 2 * 4 * 49


def test_lora_parameter_count_matches_smollm2_adapter(bench):
    shapes = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
              "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    # PEFT reports 4,884,480 trainable parameters for r=16 on the seven projections of SmolLM2-135M.
    assert bench.lora_parameter_count(shapes, list(shapes), 16, 30) == 4_884_480


def test_sequence_lengths_from_mask_packed_positions_or_shape(bench):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert bench.sequence_lengths((2, 4), attention_mask=mask) == [3, 2]
    packed = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert bench.sequence_lengths((1, 6), position_ids=packed) == [3, 2, 1]
    assert bench.sequence_lengths((2, 5)) == [5, 5]


MACHINE = {"cpu_class": "AVX2 (bf16 emulated): test CPU", "precision": "float32"}


def results(bench, ours_seconds=(10.0, 11.0, 9.0), trl_seconds=(20.0, 22.0, 18.0), tuned_seconds=(15.0,) * 3,
            ours_rss=900.0, trl_rss=1000.0, ours_loss=1.00, trl_loss=1.01) -> dict:
    return {"ours": [side(bench, 3000, t, ours_rss, ours_loss) for t in ours_seconds],
            "trl": [side(bench, 3000, t, trl_rss, trl_loss) for t in trl_seconds],
            "trl_tuned": [side(bench, 3000, t, trl_rss, trl_loss) for t in tuned_seconds]}


def test_summary_has_exactly_the_issue_keys_medians_spreads_and_ratios(bench):
    summary = bench.summarize(results(bench), peak_flops=1e12, machine=MACHINE, hash_ratio=0.97,
                              batched_gen_ratio=4.2)
    assert tuple(summary) == bench.SUMMARY_KEYS
    assert summary["ours_real_tok_s"] == 300.0 and summary["trl_real_tok_s"] == 150.0  # medians of 3 runs
    assert summary["trl_tuned_real_tok_s"] == 200.0
    assert summary["ratio"] == 2.0 and summary["ratio_tuned"] == 1.5
    assert summary["real_tok_s_spread"]["ours"] == [272.7, 333.3]
    assert summary["runs"] == 3 and summary["precision"] == "float32" and summary["cpu_class"].startswith("AVX2")
    json.loads(json.dumps(summary))  # one JSON object, serialisable as the last line
    assert all(bench.target_checks(summary).values())


def test_target_checks_report_misses_and_unmeasured(bench):
    summary = bench.summarize(results(bench, ours_seconds=(20.0,) * 3, ours_rss=1100.0, ours_loss=1.10),
                              1e12, MACHINE, None, None)
    checks = bench.target_checks(summary)
    assert checks["real tokens/s ratio to TRL >= 1.5"] is False
    assert checks["peak RSS ours <= TRL"] is False and checks["peak RSS ours <= TRL tuned"] is False
    assert [v for k, v in checks.items() if "hash" in k] == [None]


def test_table_lists_every_side_the_ratios_and_the_spread(bench):
    table = bench.format_table(results(bench), 1e12)
    line = next(row for row in table.splitlines() if row.startswith("real tokens/s "))
    assert [cell.strip() for cell in line.split("|")] == ["real tokens/s", "300.0", "150.0", "200.0", "2.00x", "1.50x"]
    spread = next(row for row in table.splitlines() if row.startswith("real tokens/s min-max"))
    assert "272.7-333.3" in spread
    assert "peak RSS, MB" in table and "MFU" in table and "TRL tuned" in table
