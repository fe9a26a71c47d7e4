"""train.report_to with the real backends: every logged number lands in TensorBoard's event
files and the offline wandb run, samples tables in each, and nothing is written by a
Trainer that never steps."""
import glob
import json
import os

import pytest
from helpers import make_run

from score_fast.demo import task as demo_task
from score_fast.trainer import Trainer


def test_tensorboard_wandb_and_jsonl_hold_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    c = make_run(tmp_path, report_to=["jsonl", "tensorboard", "wandb"], log_samples_every=2,
                 log_samples=3)
    tr = Trainer(c)
    assert not os.path.exists(os.path.join(c.train.run_dir, "metrics.jsonl"))
    hist = tr.train(progress=False)  # 4 steps: the run's end closes the backends
    run = c.train.run_dir
    assert [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))] == hist

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(os.path.join(run, "tensorboard"),
                          size_guidance={"scalars": 0, "tensors": 0})
    ev.Reload()
    for key in ("loss", "reward_t1", "lr", "time/policy_s", "mem/host_peak_rss_gib"):
        got = [(e.step, e.value) for e in ev.Scalars(key)]
        assert got == [(m["step"], pytest.approx(float(m[key]), rel=1e-6)) for m in hist], key
    text = [t for t in ev.Tags()["tensors"] if "samples" in t]
    assert text  # the samples tables (add_text)

    samples = [json.loads(x) for x in open(os.path.join(run, "samples.jsonl"))]
    assert [s["step"] for s in samples] == [2, 2, 2, 4, 4, 4]
    assert set(samples[0]) == {"step", "problem", "attempt1", "attempt2", "r1", "r2"}

    files = glob.glob(os.path.join(run, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1
    raw = open(files[0], "rb").read()
    for key in ("reward_t2", "time/attempt1_s", "grad_norm", "samples"):
        assert key.encode() in raw, key


def test_a_missing_backend_fails_before_any_model_loads(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb here")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    import score_fast.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "load_model", lambda *a, **k: 1 / 0)
    with pytest.raises(ImportError, match="train.report_to has wandb: pip install wandb"):
        Trainer(make_run(tmp_path, report_to=["wandb"]))


def test_plot_draws_a_runs_curves(tmp_path, capsys):
    from PIL import Image

    from score_fast.cli import main
    c = make_run(tmp_path, eval_every=2)  # held-out points at steps 2 and 4
    held = tmp_path / "heldout.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in demo_task.make_problems(3, seed=5)))
    c.train.eval_file = str(held)
    Trainer(c).train(progress=False)
    assert main(["plot", c.train.run_dir]) == 0
    out = capsys.readouterr().out.strip()
    assert out == os.path.join(c.train.run_dir, "curves.png")
    img = Image.open(out)
    assert img.size == (880, 800)
    assert len(set(img.convert("L").getdata())) > 20  # drawn, not blank
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_single_turn_samples_have_no_attempt2_columns(tmp_path):
    """sample_rows without r2 (a train.single_turn step): step, problem, attempt1, r1 rows,
    in samples.jsonl and as TensorBoard's samples table."""
    pytest.importorskip("tensorboard")
    from types import SimpleNamespace

    from score_fast.reporting import Reporter, sample_rows
    eps = [SimpleNamespace(text1=t, text2="") for t in ("12", "x|y")]
    rows = sample_rows(3, ["1+11", "2+2"], eps, [1.0, 0.0], None, 4)
    assert rows == [{"step": 3, "problem": "1+11", "attempt1": "12", "r1": 1.0},
                    {"step": 3, "problem": "2+2", "attempt1": "x|y", "r1": 0.0}]
    rep = Reporter(["jsonl", "tensorboard"], str(tmp_path))
    rep.log(3, {"step": 3, "loss": 0.5, "reward_t1": 0.5})
    rep.log_samples(3, rows)
    rep.close()
    assert [json.loads(x) for x in open(tmp_path / "samples.jsonl")] == rows
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    ev.Reload()
    (tag,) = [t for t in ev.Tags()["tensors"] if "samples" in t]
    text = ev.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| step | problem | attempt1 | r1 |") and "x\\|y" in text
