"""The step-time model (score_fast/steptime.py): the issue's worked decode example, the
bounds where the arithmetic says, and `score-fast plan --device`."""
import pytest

from score_fast import memory, steptime
from score_fast.memory import StepShape

SHAPE = dict(episodes=512, prompt_tokens=300, max_new_tokens=512, instruction_tokens=64)


@pytest.mark.parametrize("batch, decode_s", [(512, 4.7), (64, 11.0)])
def test_decode_matches_the_worked_example(batch, decode_s):
    """Qwen2.5-1.5B on one H100, 128 prompts x 4 samples, bf16, CUDA graphs: ~4.7 s of
    decode at batch 512, ~11 s at batch 64 (issue 29's arithmetic: the weights and every
    live row's KV cache read once a step)."""
    phases = {p.name: p for p in steptime.predict_time(
        memory.SHAPES["qwen2.5-1.5b"], steptime.DEVICES["H100"], graphs=True,
        shape=StepShape(in_flight=batch, gen_batch_size=batch, **SHAPE))}
    got = phases["attempt 1"].seconds + phases["attempt 2"].seconds
    assert got == pytest.approx(decode_s, rel=0.05)
    assert phases["attempt 1"].bound == phases["attempt 2"].bound == "bandwidth"
    assert phases["policy fwd+bwd"].bound == "compute"
    assert phases["optimizer"].bound == "bandwidth"


def test_launches_bound_a_decode_step_without_graphs():
    kw = dict(shape=StepShape(in_flight=64, gen_batch_size=64, **SHAPE))
    cfg, h100 = memory.SHAPES["qwen2.5-0.5b"], steptime.DEVICES["H100"]
    eager = {p.name: p for p in steptime.predict_time(cfg, h100, **kw)}
    graphs = {p.name: p for p in steptime.predict_time(cfg, h100, graphs=True, **kw)}
    assert eager["attempt 1"].bound == "launch" and graphs["attempt 1"].bound == "bandwidth"
    assert eager["attempt 1"].seconds > 3 * graphs["attempt 1"].seconds
    # checkpointing recomputes the forward: the policy phase x 4/3
    on = steptime.predict_time(cfg, h100, gradient_checkpointing=True, **kw)
    assert on[-2].flops == pytest.approx(4 / 3 * eager["policy fwd+bwd"].flops)


def test_measured_host_rates_are_plausible():
    r = steptime.measure_host(threads=1)
    assert 1e9 < r.flops < 1e13 and 1e9 < r.bandwidth < 1e12 and 1e-7 < r.launch < 1e-3


def test_plan_prints_phase_times(capsys):
    from score_fast.cli import main
    assert main(["plan", "--model", "qwen2.5-1.5b", "--device", "H100"]) == 0
    out = capsys.readouterr().out
    assert "step time on H100 SXM" in out and "attempt 2" in out and "bandwidth" in out
    assert main(["plan", "--model", "qwen2.5-1.5b", "--device", "TPU"]) == 2
    assert "--device 'TPU': one of A100, H100, H200, B200 or host" in capsys.readouterr().err
