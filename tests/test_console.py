"""What a run tells its user on the console: the summary before step 1 (and a CPU run that is
too large), a step whose every reward is 0, Ctrl-C (one line, exit 130, an exact resume), a
resume of a finished run, the demo's warm-up progress and its held-out heading."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import make_run, write_config
from score_fast import trainer as trainer_mod
from score_fast.trainer import Trainer, size_warning

pytest.importorskip("jsonargparse")  # the GPU image (bench/gpu_check.sh) does not have it
from score_fast.cli import main, parse_config  # noqa: E402

NO_SIGNAL = ("every advantage is 0, so the step has no reward signal and learns nothing "
             "(loss, grad norm and KL stay 0 while the policy is the reference).")


def _messages(caplog, level="WARNING"):
    return [r.getMessage() for r in caplog.records
            if r.name == "score_fast" and r.levelname == level]


def _files(run_dir):
    """Every file of the run's checkpoints (and metrics.jsonl): size, mtime, sha256."""
    out = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, run_dir)
            if rel.startswith("checkpoint-") or rel == "metrics.jsonl":
                st = os.stat(path)
                with open(path, "rb") as f:
                    out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def test_summary_before_step_1_and_a_finished_run_resumed_does_nothing(
        tmp_path, caplog, capsys, monkeypatch):
    """score-fast train logs rows, parameters, the step plan, run_dir, device and dtype
    before step 1 (and the CPU size warning, here at a threshold the tiny run passes); the
    same command with --train.resume=true after the last step says the run is complete,
    exits 0, and leaves the checkpoints and metrics as they were."""
    c = make_run(tmp_path)
    cfg = write_config(c, tmp_path / "run.yaml")
    monkeypatch.setattr(trainer_mod, "CPU_STEP_TOKENS", 10)
    with caplog.at_level("INFO", logger="score_fast"):
        assert main(["train", "--config", cfg]) == 0
    import transformers
    n = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(
        c.model.path).parameters())  # a full fine-tune: every parameter trains
    info = _messages(caplog, "INFO")
    assert info[0] == "\n".join([
        f"rows: 12 from {c.data.train_file}",
        f"model: {c.model.path}: {n:,} trainable of {n:,} parameters",
        "plan: 2 Stage I + 2 Stage II steps = 4 steps, from step 0; 3 prompts x 2 samples = 6 "
        "episodes a step, 2 attempts of up to 4 new tokens",
        f"run_dir: {c.train.run_dir}; device cpu, float32",
        info[0].splitlines()[-1]])
    assert info[0].splitlines()[-1].startswith(
        "gradient checkpointing off: the training phase fits without it (")
    assert _messages(caplog)[0] == (
        "this run is large for a CPU: 4 steps x 6 episodes (3 prompts x 2 samples) x 2 "
        "attempts x up to 4 new tokens = up to 48 generated tokens a step (1.9e+02 in all), "
        "each also trained on; a CPU step of more than 10 a rank takes minutes or more with a "
        "real model. Shrink it (train.prompts_per_step, rollout.samples_per_prompt, "
        "rollout.max_new_tokens, stage1.steps / stage2.steps) or run it on a GPU")
    before = _files(c.train.run_dir)
    assert "checkpoint-4/trainer_state.pt" in before
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level("INFO", logger="score_fast"):
        assert main(["train", "--config", cfg, "--train.resume=true"]) == 0
    info = _messages(caplog, "INFO")
    assert info[-1] == f"already complete: 4 steps ({c.train.run_dir}); nothing to do"
    assert not any(m.startswith("rows: ") for m in info)  # no summary: nothing runs
    assert "score:" not in capsys.readouterr().err  # no progress bar either
    assert _files(c.train.run_dir) == before


def test_steps_whose_every_reward_is_0_are_named_then_counted(tmp_path, caplog, monkeypatch):
    """A reward that gives 0 to every sample of steps 1, 3 and 4 (not 2): a warning at step 1
    naming the zero reasons and what to check, the next at the 2nd such step (every 2, here)
    with the count, none at steps 2 and 4, and the count at the run's end."""
    reward = tmp_path / "mostly_zero.py"
    reward.write_text("calls = []\n"
                      "def mostly_zero(completions, **_):\n"
                      "    calls.append(1)\n"  # 2 calls a step: attempt 1, attempt 2
                      "    step = (len(calls) + 1) // 2\n"
                      "    return [float(step == 2)] * len(completions)\n")
    c = make_run(tmp_path)
    c.reward.function = f"{reward}:mostly_zero"
    monkeypatch.setattr(trainer_mod, "ZERO_REWARD_WARN_EVERY", 2)
    tr = Trainer(c)
    with caplog.at_level("WARNING", logger="score_fast"):
        hist = tr.train(progress=False)
    assert [m["reward_t1"] for m in hist] == [0.0, 1.0, 0.0, 0.0]
    hint = ("Check the reward function against a few responses and the format it expects "
            "against what the prompt asks for; train.log_samples_every=1 writes responses to "
            "samples.jsonl (warned again every 2 such steps)")
    assert _messages(caplog) == [
        f"step 1: every reward is 0 (attempt 1 zero:6; attempt 2 zero:6): {NO_SIGNAL} {hint}",
        f"step 3: every reward is 0 (attempt 1 zero:6; attempt 2 zero:6); 2 of the 3 steps "
        f"this run took had every reward 0: {NO_SIGNAL} {hint}",
        "3 of the 4 steps this run took had every reward 0, the first at step 1: no reward "
        "signal, nothing learned from them (that step's warning says what to check)"]
    assert (tr.zero_reward_steps, tr.steps_taken) == (3, 4)


def test_zero_reward_hint_of_the_math_reward(tmp_path):
    """The math reward's hint names the answer format it reads and the reference field."""
    c = make_run(tmp_path)
    c.reward.kind, c.reward.function, c.rollout.instruction = "math", "", None
    tr = Trainer(c)
    assert tr._zero_reward_hint() == (
        "Check the answer format the math reward expects: a final answer in \\boxed{...} or "
        "\"The final answer is X. I hope it is correct.\" (the prompt, data.prompt=auto, asks "
        "for it; reward.lenient_math=true also takes a last plain number), and the reference "
        "in the rows' 'answer' field; train.log_samples_every=1 writes responses to "
        "samples.jsonl")


def test_cpu_size_warning_for_the_math_recipe(tmp_path):
    """The paper's MATH recipe on a CPU gets the warning with its numbers and the fields that
    shrink it; the same on a GPU, and the tiny test run on a CPU, get none."""
    math = parse_config(["train", "--recipe", "math", "--model.path", "m",
                         "--data.train_file", "d.jsonl"])
    assert size_warning(math, torch.device("cpu")) == (
        "this run is large for a CPU: 3,000 steps x 512 episodes (128 prompts x 4 samples) x "
        "2 attempts x up to 1,024 new tokens = up to 1,048,576 generated tokens a step "
        "(3.1e+09 in all), each also trained on; a CPU step of more than 8,192 a rank takes "
        "minutes or more with a real model. Shrink it (train.prompts_per_step, "
        "rollout.samples_per_prompt, rollout.max_new_tokens, stage1.steps / stage2.steps) or "
        "run it on a GPU")
    assert size_warning(math, torch.device("cuda", 0)) is None
    assert size_warning(make_run(tmp_path), torch.device("cpu")) is None


SLOW_PARITY = """import os, time
def slow_parity(completions, **_):
    time.sleep(float(os.environ.get("SLOW_REWARD_S", "0")))
    return [float(len(c) % 2 == 0) for c in completions]
"""


def _score_fast(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", **kw.pop("env", {})}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "score_fast", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _steps(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_the_run_resumes(tmp_path):
    """SIGINT to `python -m score_fast train` (its process group, as a terminal's Ctrl-C)
    once a step is logged: exit 130, no traceback, one line naming the step reached and the
    checkpoint a resume continues from; --train.resume=true then finishes the run, every step
    logged once, in order."""
    reward = tmp_path / "slow.py"
    reward.write_text(SLOW_PARITY)
    c = make_run(tmp_path, save_every=1)
    c.stage2.steps = 4  # 6 steps: the interrupt lands well before the end
    c.reward.function = f"{reward}:slow_parity"
    cfg = write_config(c, tmp_path / "run.yaml")
    metrics = os.path.join(c.train.run_dir, "metrics.jsonl")
    # its own session (so the group signal reaches only it) with Python's SIGINT handler
    # installed even if this process ignores SIGINT (a background job)
    proc = _score_fast(["train", "--config", cfg], env={"SLOW_REWARD_S": "0.5"},
                       start_new_session=True,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300  # a slow, shared 2-core machine
        while not (os.path.isfile(metrics) and os.path.getsize(metrics)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step logged in 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err, err
    stopped = [line for line in err.splitlines() if "stopped after" in line]
    assert len(stopped) == 1, err
    m = re.fullmatch(r"stopped after step (\d) of 6 \(interrupted\); resume with "
                     r"--train\.resume=true \(from checkpoint-(\d)(.*)\)", stopped[0])
    assert m, stopped
    step, saved, again = int(m[1]), int(m[2]), m[3]
    assert 1 <= saved <= step < 6
    assert again == ("" if saved == step else f"; step {step} is taken again"
                     if saved + 1 == step else f"; steps {saved + 1}-{step} are taken again")
    complete = sorted(int(d.split("-")[1]) for d in os.listdir(c.train.run_dir)
                      if d.startswith("checkpoint-"))
    assert complete[-1] == saved  # the newest checkpoint is the one named
    logged = _steps(metrics)
    assert logged == list(range(1, len(logged) + 1)) and len(logged) <= step

    resumed = _score_fast(["train", "--config", cfg, "--train.resume=true"])
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err
    assert f"resumed from {os.path.join(c.train.run_dir, f'checkpoint-{saved}')} at step " \
           f"{saved}" in err
    assert _steps(metrics) == [1, 2, 3, 4, 5, 6]
    assert os.path.isfile(os.path.join(c.train.run_dir, "checkpoint-6", "trainer_state.pt"))


def test_demo_warm_up_reports_progress_and_trains_on_the_held_out_problems(tmp_path,
                                                                          monkeypatch):
    """warm_up says step / total, loss and elapsed every `every` steps; its transcripts are
    drawn from all 200 problems, the held-out ones included (what the heading says)."""
    from score_fast.demo import experiment
    seen = set()
    transcripts = experiment.warmup_transcripts

    def record(rows, *a, **kw):
        seen.update(r["problem"] for r in rows)
        return transcripts(rows, *a, **kw)
    monkeypatch.setattr(experiment, "warmup_transcripts", record)
    lines = []
    experiment.warm_up(str(tmp_path), experiment.demo_rows(), steps=5, every=2,
                       say=lines.append)
    assert lines[0] == "warm-up: 5 supervised steps on all 200 problems ..."
    assert [re.sub(r"loss \d+\.\d{3}, \d+ s", "loss L, T s", x) for x in lines[1:3]] == [
        "warm-up: step 2/5, loss L, T s", "warm-up: step 4/5, loss L, T s"]
    assert lines[3].startswith("warm-up done (loss ") and len(lines) == 4
    held_out = {r["problem"] for r in experiment.split_rows(experiment.demo_rows(), 50)[1]}
    assert len(seen & held_out) > 25  # 5 x 64 draws from 200: most of the 50


def test_demo_table_says_the_warm_up_saw_the_held_out_problems(tmp_path):
    from score_fast.demo.experiment import held_out_heading, run_demo
    assert held_out_heading(50, 200, 600) == (
        "held-out problems (50; never seen by RL, but in the warm-up like all 200: 600 steps "
        "x 64 transcripts drawn from all of them, ~192 of each problem; so they test whether "
        "RL's correction carries to problems RL did not train on, not to unseen problems)")
    run_demo(str(tmp_path / "demo"), warmup_steps=3, stage1_steps=1, stage2_steps=1,
             quiet=True)
    lines = (tmp_path / "demo" / "table.md").read_text().splitlines()
    assert lines[0] == "RL-train problems (150; RL trained on these, the warm-up saw all 200):"
    assert held_out_heading(50, 200, 3) + ":" in lines
