"""torch.distributed on CPU (gloo), 2 processes launched by torchrun, as a user runs it:
one step on 2 ranks equals one process on the same global batch; a checkpoint written by 2
ranks loads with from_pretrained in one process and resumes on 2 ranks to the same step as
an uninterrupted run; a world size that does not divide the prompts is a clear error."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import make_run, torchrun, write_config

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("precision", ["fp32", "bf16_lora", "fp32_single_turn"])
def test_two_ranks_equal_one_process(tmp_path, precision):
    """fp32: the same step to fp32 rounding. bf16_lora: a bf16 base sharded with fp32 LoRA
    adapters in the same FSDP2 units (mixed dtypes, gathered in bf16), one process vs two:
    the adapters' update agrees to bf16 compute accuracy (and their random init is the same
    at every world size). fp32_single_turn: train.single_turn's attempt-1-only episodes,
    balanced over the ranks by their (shorter) lengths."""
    # baseline none: advantages = rewards, so the gradient is not a near-cancellation
    c = make_run(tmp_path, max_tokens=64, lr=1e-3, prompts_per_step=2, baseline="none",
                 single_turn=precision == "fp32_single_turn")
    lora = precision == "bf16_lora"
    if lora:
        c.model.dtype, c.model.lora.rank = "bf16", 4
    cfg = write_config(c, tmp_path / "c.yaml")
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}.pt"
        torchrun([os.path.join(HERE, "dist_step.py"), cfg, str(out)], n=n)
        outs[n] = torch.load(out, weights_only=False)
    one, two = outs[1], outs[2]
    assert one["n1"] == two["n1"] and one["n2"] == two["n2"] and one["n1"] > 0
    assert (one["n2"] == 0) == c.train.single_turn
    if lora:  # bf16 activations: ~3 significant digits; the adapters are what trained
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-3, abs=1e-5)
        assert two["norm"] == pytest.approx(one["norm"], rel=1e-3)
        adapters = [k for k in one["state"] if "lora_" in k]
        assert adapters and all(one["state"][k].dtype == torch.float32 for k in adapters)
        # Adam's first step moves each weight by ~lr * sign(grad): where bf16 noise flips the
        # sign of a near-zero gradient (4 of 11776 here) the two runs differ by up to 2 lr
        diff = torch.cat([(two["state"][k] - one["state"][k]).abs().flatten() for k in adapters])
        assert (diff <= 1e-4).float().mean() >= 0.995 and diff.max() <= 2e-3 + 1e-6
        assert any(one["state"][k].abs().max() > 0 for k in adapters if "lora_B" in k)
        return
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7)
    assert two["norm"] == pytest.approx(one["norm"], rel=1e-4)
    # Adam's first step is lr * g / (|g| + eps): at the few weights whose gradient is near 0
    # (more of them with single_turn's fewer trained tokens) fp32 summation order moves it
    # by a few 1e-6 (lr 1e-3)
    atol = 1e-5 if c.train.single_turn else 1e-6
    for k, a in one["state"].items():
        torch.testing.assert_close(two["state"][k], a, rtol=1e-5, atol=atol, msg=k)
    from transformers import AutoModelForCausalLM
    init = AutoModelForCausalLM.from_pretrained(c.model.path).state_dict()
    # the step really moved the weights (lr 1e-3 on every tensor Adam touched)
    assert sum(not torch.allclose(one["state"][k], init[k]) for k in init) >= len(init) // 2


def test_checkpoint_on_two_ranks_loads_and_resumes(tmp_path):
    # 3 steps on 2 ranks, checkpoints at 2 and 3; then resume a copy of checkpoint-2 on 2
    # ranks: its step 3 must equal the uninterrupted step 3
    c = make_run(tmp_path, max_tokens=64, prompts_per_step=2, save_every=2)
    c.stage1.steps, c.stage2.steps = 1, 2
    run_a = tmp_path / "a"
    c.train.run_dir = str(run_a)
    cfg = write_config(c, tmp_path / "a.yaml")
    p = torchrun(["-m", "score_fast", "train", "--config", cfg])
    ck2, ck3 = run_a / "checkpoint-2", run_a / "checkpoint-3"
    assert (ck2 / "optimizer").is_dir() and (ck2 / "rng-1.pt").is_file()
    lines = [json.loads(x) for x in (run_a / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]  # rank 0 alone writes the log
    assert p.stdout.count("step 3 stage 2") <= 1
    from transformers import AutoModelForCausalLM
    a3 = AutoModelForCausalLM.from_pretrained(ck3).state_dict()  # one process loads it
    run_b = tmp_path / "b"
    run_b.mkdir()
    shutil.copytree(ck2, run_b / "checkpoint-2")
    c.train.run_dir, c.train.resume = str(run_b), True
    torchrun(["-m", "score_fast", "train", "--config", write_config(c, tmp_path / "b.yaml")])
    b3 = AutoModelForCausalLM.from_pretrained(run_b / "checkpoint-3").state_dict()
    for k in a3:
        torch.testing.assert_close(b3[k], a3[k], rtol=0, atol=0, msg=k)
    a2 = AutoModelForCausalLM.from_pretrained(ck2).state_dict()
    assert any(not torch.equal(a2[k], a3[k]) for k in a3)


def test_single_turn_trains_on_two_ranks(tmp_path):
    """train.single_turn through the trainer's gathered step on 2 ranks (each samples its
    prompts' attempt 1 only): rank 0 logs every step, with no attempt-2 key."""
    c = make_run(tmp_path, max_tokens=64, prompts_per_step=2, single_turn=True)
    c.stage1.steps, c.stage2.steps = 0, 2
    p = torchrun(["-m", "score_fast", "train", "--config", write_config(c, tmp_path / "c.yaml")])
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert not [k for k in m if "_t2" in k or "delta" in k or "attempt2" in k], m
        assert m["len_t1"] > 0 and 0 <= m["reward_t1"] <= 1 and m["train_tok_s"] > 0
    assert "(attempt 1 only)" in p.stdout + p.stderr
    assert (run / "checkpoint-2").is_dir()


def test_world_size_must_divide_prompts(tmp_path):
    c = make_run(tmp_path, prompts_per_step=3)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                        "2", "--standalone", "-m", "score_fast", "train", "--config",
                        write_config(c, tmp_path / "c.yaml")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert "train.prompts_per_step=3 does not divide over 2 ranks" in p.stderr


def test_allocator_defaults_respects_the_users_choice(monkeypatch):
    from score_fast.distributed import allocator_defaults
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores the original afterwards
        monkeypatch.delenv(name)
    allocator_defaults()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    allocator_defaults()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    allocator_defaults()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
