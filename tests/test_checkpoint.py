"""Checkpoints: HF round trip, atomic writes, and resume = uninterrupted run, exactly."""
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from score_fast.checkpoint import latest_checkpoint, load_state
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


def test_resume_gives_the_same_parameters(tmp_path):
    straight = Trainer(make_run(tmp_path, run_dir=str(tmp_path / "a")))
    straight.train(progress=False)  # 4 steps: 2 Stage I + 2 Stage II
    first = Trainer(make_run(tmp_path, run_dir=str(tmp_path / "b")))
    first.train(until=2, progress=False)  # "crash" after the step-2 checkpoint
    del first
    resumed = Trainer(make_run(tmp_path, run_dir=str(tmp_path / "b"), resume=True))
    assert resumed.step == 2
    hist = resumed.train(progress=False)
    assert [m["step"] for m in hist] == [3, 4] and [m["stage"] for m in hist] == [2, 2]
    a, b = straight.policy.state_dict(), resumed.policy.state_dict()
    moved = any(not torch.equal(a[n], p) for n, p in Trainer(make_run(
        tmp_path, run_dir=str(tmp_path / "c"))).policy.state_dict().items())
    assert moved  # the run did change the weights, so the equality below means something
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n}: max diff {(a[n] - b[n]).abs().max().item():.3e}"
    sa = straight.optimizer.state_dict()["state"]
    sb = resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
