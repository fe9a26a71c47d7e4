"""Checkpoints: HF round trip, atomic writes, and resume = uninterrupted run, exactly."""
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import pytest

from score_fast.checkpoint import latest_checkpoint, load_state, rotate_checkpoints
from score_fast.config import TrainConfig
from score_fast.trainer import Trainer
from helpers import make_run


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


def _run_three(tmp_path):
    """3 steps with a checkpoint after each (make_run's tiny model); returns its config."""
    c = make_run(tmp_path, save_every=1)
    Trainer(c).train(until=3, progress=False)
    return c


@pytest.mark.parametrize("damage", ["truncate", "overwrite_4k", "empty_optimizer",
                                    "missing_file"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, caplog, damage):
    """Each damage once loaded silently or died in a library with no file named: now the
    manifest check names the file and the run resumes from checkpoint-2 (and cuts the
    metrics logged after it)."""
    c = _run_three(tmp_path)
    ck = os.path.join(c.train.run_dir, "checkpoint-3")
    weights = os.path.join(ck, "model.safetensors")
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    elif damage == "overwrite_4k":  # same size: only the checksum can tell
        with open(weights, "r+b") as f:
            f.seek(os.path.getsize(weights) // 2)
            f.write(b"\x7f" * 4096)
    elif damage == "empty_optimizer":
        state = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=False)
        state["optimizer"]["state"] = {}
        torch.save(state, os.path.join(ck, "trainer_state.pt"))
    else:
        os.remove(os.path.join(ck, "tokenizer.json"))
    c.train.resume = True
    with caplog.at_level("WARNING", logger="score_fast"):
        tr = Trainer(c)
    assert tr.step == 2
    what = {"truncate": "model.safetensors is", "overwrite_4k": "model.safetensors does not "
            "match its SHA-256", "empty_optimizer": "trainer_state.pt",
            "missing_file": "tokenizer.json is missing"}[damage]
    assert any("checkpoint-3 is damaged" in r.message and what in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    steps = [json.loads(x)["step"]
             for x in open(os.path.join(c.train.run_dir, "metrics.jsonl"))]
    assert steps == [1, 2]  # step 3 is trained again, not logged twice
    tr.train(until=3, progress=False)
    steps = [json.loads(x)["step"]
             for x in open(os.path.join(c.train.run_dir, "metrics.jsonl"))]
    assert steps == [1, 2, 3]


def test_every_checkpoint_damaged_is_an_error_naming_them(tmp_path):
    from score_fast.checkpoint import CheckpointError
    c = make_run(tmp_path, save_every=1)
    Trainer(c).train(until=2, progress=False)
    for n in (1, 2):
        with open(os.path.join(c.train.run_dir, f"checkpoint-{n}", "config.yaml"), "a") as f:
            f.write("# edited\n")
    c.train.resume = None
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged, nothing to "
                                              r"resume: checkpoint-2: config.yaml is \d+ bytes"):
        Trainer(c)


def test_resume_refuses_a_changed_run_unless_allowed(tmp_path, caplog):
    """lr and seed change what the run trains: refused, naming old and new; logging and
    saving fields may change; train.allow_config_change continues, logging each change."""
    c = make_run(tmp_path)
    Trainer(c).train(until=2, progress=False)
    c.train.resume, c.train.lr, c.train.seed = True, 5e-3, 7
    with pytest.raises(ValueError, match=r"changes the run: train.lr: 0.01 -> 0.005; "
                                         r"train.seed: 0 -> 7\. Resume with"):
        Trainer(c)
    c.train.lr, c.train.seed = 1e-2, 0
    c.train.log_every, c.train.save_every, c.train.max_tokens = 3, 5, 2048  # free to change
    assert Trainer(c).step == 2
    c.train.lr, c.train.allow_config_change = 5e-3, True
    with caplog.at_level("WARNING", logger="score_fast"):
        assert Trainer(c).step == 2
    assert any("train.lr: 0.01 -> 0.005" in r.message for r in caplog.records)


def test_an_interrupted_resave_is_recovered(tmp_path):
    """Killed between a re-save's two renames: checkpoint-2 sits in .old-checkpoint-2 and
    the new one in .tmp-checkpoint-2. The next start puts the old one back and removes the
    unfinished one, and resumes from it."""
    c = make_run(tmp_path)
    Trainer(c).train(until=2, progress=False)
    run = c.train.run_dir
    os.replace(os.path.join(run, "checkpoint-2"), os.path.join(run, ".old-checkpoint-2"))
    os.makedirs(os.path.join(run, ".tmp-checkpoint-2"))
    c.train.resume = True
    tr = Trainer(c)
    assert tr.step == 2 and sorted(n for n in os.listdir(run) if "checkpoint" in n) == [
        "checkpoint-2"]
