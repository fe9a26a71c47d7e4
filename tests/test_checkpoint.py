"""Checkpoints: HF round trip, atomic writes, and resume = uninterrupted run, exactly."""
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pytest

from score_fast.checkpoint import latest_checkpoint, load_state, rotate_checkpoints
from score_fast.config import TrainConfig
from score_fast.trainer import Trainer
from test_trainer import make_run


def test_round_trip_through_from_pretrained(tmp_path):
    tr = Trainer(make_run(tmp_path))
    tr.train(until=1, progress=False)
    path = tr.save()
    assert os.path.basename(path) == "checkpoint-1"
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for (n, a), b in zip(tr.policy.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("3+4")["input_ids"] == tr.tokenizer("3+4")["input_ids"]
    state = load_state(path)
    assert state["step"] == 1 and state["stage"] == 1
    assert set(state["rng"]) >= {"torch", "python", "numpy"}
    assert os.path.isfile(os.path.join(path, "config.yaml"))


def test_half_written_checkpoint_is_ignored(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "trainer_state.pt").write_bytes(b"x")
    (run / ".tmp-checkpoint-4").mkdir()  # a crash mid-write
    (run / ".tmp-checkpoint-4" / "trainer_state.pt").write_bytes(b"x")
    (run / "checkpoint-6").mkdir()  # no state file: not complete
    assert latest_checkpoint(str(run)) == str(run / "checkpoint-2")


@pytest.mark.parametrize("schedule", [{}, {"lr_schedule": "linear", "warmup_steps": 2}],
                         ids=["constant", "linear_warmup"])
def test_resume_gives_the_same_parameters(tmp_path, schedule):
    straight = Trainer(make_run(tmp_path, run_dir=str(tmp_path / "a"), **schedule))
    full = straight.train(progress=False)  # 4 steps: 2 Stage I + 2 Stage II
    first = Trainer(make_run(tmp_path, run_dir=str(tmp_path / "b"), **schedule))
    first.train(until=2, progress=False)  # "crash" after the step-2 checkpoint
    del first
    resumed = Trainer(make_run(tmp_path, run_dir=str(tmp_path / "b"), resume=True,
                               **schedule))
    assert resumed.step == 2
    hist = resumed.train(progress=False)
    assert [m["step"] for m in hist] == [3, 4] and [m["stage"] for m in hist] == [2, 2]
    lr = 1e-2  # make_run's
    expect = ([lr] * 4 if not schedule else  # warmup from 0 over 2 steps, then linear to 0
              [0.0, lr / 2, lr, lr / 2])
    assert [m["lr"] for m in full] == pytest.approx(expect)
    assert [m["lr"] for m in hist] == pytest.approx(expect[2:])
    a, b = straight.policy.state_dict(), resumed.policy.state_dict()
    moved = any(not torch.equal(a[n], p) for n, p in Trainer(make_run(
        tmp_path, run_dir=str(tmp_path / "c"))).policy.state_dict().items())
    assert moved  # the run did change the weights, so the equality below means something
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n}: max diff {(a[n] - b[n]).abs().max().item():.3e}"
    sa = straight.optimizer.state_dict()["state"]
    sb = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_rotation_keeps_the_newest_complete(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6, 8):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.pt").write_bytes(b"x")
    (run / "checkpoint-10").mkdir()  # incomplete (no state file): neither kept nor counted
    (run / ".tmp-checkpoint-12").mkdir()  # being written
    gone = rotate_checkpoints(str(run), 2)
    assert sorted(os.path.basename(g) for g in gone) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(os.listdir(run)) == [".tmp-checkpoint-12", "checkpoint-10", "checkpoint-6",
                                       "checkpoint-8"]
    assert rotate_checkpoints(str(run), 1) == [str(run / "checkpoint-6")]
    assert latest_checkpoint(str(run)) == str(run / "checkpoint-8")  # never removed
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        rotate_checkpoints(str(run), 0)
    with pytest.raises(ValueError, match="train.keep_last must be >= 1"):
        TrainConfig(keep_last=0)


def test_keep_last_in_training_then_resume(tmp_path):
    """save_every 1 and keep_last 2: after 3 steps only checkpoints 2 and 3 are left, and the
    run resumes from 3 to the end."""
    c = make_run(tmp_path, save_every=1, keep_last=2)
    Trainer(c).train(until=3, progress=False)
    names = sorted(n for n in os.listdir(c.train.run_dir) if n.startswith("checkpoint"))
    assert names == ["checkpoint-2", "checkpoint-3"]
    resumed = Trainer(make_run(tmp_path, save_every=1, keep_last=2, resume=True))
    assert resumed.step == 3
    resumed.train(progress=False)
    names = sorted(n for n in os.listdir(c.train.run_dir) if n.startswith("checkpoint"))
    assert names == ["checkpoint-3", "checkpoint-4"]
