"""The ablation runner (score_fast.demo.ablate): each variant's config differs from full SCoRe in
exactly the intended fields, the summary statistics, and the quick mode end to end. Which
tokens each variant trains, with which advantage and KL weight, is checked against a hand
computation in tests/test_trainer.py (test_objective_matches_hand_computed)."""
import dataclasses
import json
import math

import pytest

from score_fast.demo.ablate import VARIANTS, format_summary, summarize, variant_config

N1, N2 = 5, 7


def _flat(config) -> dict:
    d = dataclasses.asdict(config)
    return {f"{k}.{j}": v for k, sub in d.items() for j, v in sub.items()}


def _diff(variant) -> dict:
    full = _flat(variant_config(VARIANTS[-1], "b", "d", "r", 3, N1, N2))
    got = _flat(variant_config(variant, "b", "d", "r", 3, N1, N2))
    return {k: got[k] for k in got if got[k] != full[k]}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_variant_differs_from_score_as_intended(variant):
    want = {
        "base": {},  # not trained at all (rl=False): the config is unused
        "single-turn RL": {"stage1.steps": 0, "stage2.steps": N1 + N2, "stage2.alpha": 0.0,
                           "train.single_turn": True},
        "naive multi-turn RL": {"stage1.steps": 0, "stage2.steps": N1 + N2,
                                "stage2.alpha": 0.0},
        "SCoRe w/o Stage I": {"stage1.steps": 0, "stage2.steps": N1 + N2},
        "SCoRe w/o shaping": {"stage2.alpha": 0.0},
        "STaR in Stage II": {"stage2.method": "star"},
        "SCoRe": {},
    }[variant.name]
    assert _diff(variant) == want
    assert variant.rl == (variant.name != "base")


def test_full_score_is_the_paper_schedule():
    c = variant_config(VARIANTS[-1], "b", "d", "r", 3, N1, N2)
    assert (c.stage1.steps, c.stage2.steps, c.stage2.alpha, c.stage1.beta1, c.stage1.beta2,
            c.stage2.beta1, c.stage2.method, c.train.single_turn, c.train.seed) == (
        N1, N2, 10.0, 0.01, 0.1, 0.01, "reinforce", False, 3)


def test_summary_mean_and_std():
    m = lambda a1, a2: {  # noqa: E731
        "acc_t1": a1, "acc_t2": a2, "delta": a2 - a1, "delta_i2c": 0.0,
        "delta_c2i": 0.0, "edit_ratio": 0.5}
    results = [{"variant": "x", "seed": s, "train": m(a, b), "held_out": m(a, b)}
               for s, (a, b) in enumerate([(0.2, 0.4), (0.4, 0.4)])]
    s = summarize(results, ["x", "absent"])
    mean, std = s["train"]["x"]["delta"]
    assert mean == pytest.approx(0.1) and std == pytest.approx(0.1)  # deltas 0.2 and 0.0
    assert s["held_out"]["x"]["acc_t1"] == pytest.approx((0.3, 0.1))
    assert "absent" not in s["train"]
    text = format_summary(s, {"seeds": [0, 1], "n1": 1, "n2": 1}, 10, 5)
    assert ("| x | 30.0 ± 10.0 | 40.0 ± 0.0 | +10.0 ± 10.0 | 0.0 ± 0.0 | 0.0 ± 0.0 | "
            "0.500 ± 0.000 |") in text


def test_quick_ablation_end_to_end(tmp_path):
    from score_fast.cli import main
    out = tmp_path / "ab"
    assert main(["ablate", "--quick", "true", "--seeds", "[0]", "--workers", "1",
                 "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in data["results"]] == [v.name for v in VARIANTS]
    for r in data["results"]:
        for split in ("train", "held_out"):
            m = r[split]
            assert 0 <= m["acc_t1"] <= 1 and 0 <= m["acc_t2"] <= 1
            assert math.isclose(m["delta"], m["acc_t2"] - m["acc_t1"], abs_tol=1e-9)
            assert math.isclose(m["delta"], m["delta_i2c"] - m["delta_c2i"], abs_tol=1e-9)
    base = next(r for r in data["results"] if r["variant"] == "base")
    trained = [r for r in data["results"] if r["variant"] != "base"]
    # every RL variant wrote its run directory and its metrics log
    assert all((out / "seed0" / r["variant"].replace(" ", "_").replace("/", "") /
                "metrics.jsonl").exists() for r in trained)
    assert base["train"]["edit_ratio"] >= 0
    table = (out / "table.md").read_text()
    assert table.count("| SCoRe |") == 2 and "held-out" in table
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
