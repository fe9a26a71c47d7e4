"""The score-fast command: --help lists every field with its default, YAML + dotted
overrides reach the config, the resolved config is saved, train and eval run."""
import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from score_fast.cli import main, parse_config
from score_fast.config import Config, EvalConfig
from test_trainer import make_run


def _fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not
                                    dataclasses.MISSING else None):
            yield from _fields(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.default


def test_help_lists_every_field_with_its_default():
    out = subprocess.run([sys.executable, "-m", "score_fast.cli", "train", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for name, default in _fields(Config):
        assert f"--{name} " in text, name
        shown = "null" if default is None else str(default)
        assert f"--{name}" in text and f"default: {shown})" in text, (name, shown)
    assert "--stage2.alpha ALPHA (type: float, default: 10.0)" in text
    assert "--train.resume {true,false} (type: bool, default: False)" in text


def test_yaml_and_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  path: /m\nstage2:\n  alpha: 3.0\n  steps: 7\n")
    c = parse_config(["train", "--config", str(cfg), "--stage2.alpha=5", "--train.lr=0.5"])
    assert isinstance(c, Config)
    assert (c.model.path, c.stage2.alpha, c.stage2.steps, c.train.lr) == ("/m", 5.0, 7, 0.5)
    assert c.stage1.beta2 == 0.1 and c.rollout.samples_per_prompt == 4  # defaults kept
    e = parse_config(["eval", "--checkpoint", "ck", "--data", "d.jsonl"])
    assert e == EvalConfig(checkpoint="ck", data="d.jsonl")
    with pytest.raises(SystemExit):
        parse_config(["train", "--stage2.alpah=5"])


def test_train_then_eval(tmp_path, capsys):
    c = make_run(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(dataclasses.asdict(c)))
    run_dir = tmp_path / "cli_run"
    assert main(["train", "--config", str(cfg), f"--train.run_dir={run_dir}",
                 "--stage2.steps=1", "--stage2.alpha=5"]) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["stage2"] == {"steps": 1, "alpha": 5.0, "beta1": 0.01}
    assert saved["train"]["run_dir"] == str(run_dir)
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint")) == [
        "checkpoint-2", "checkpoint-3"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    main(["eval", "--checkpoint", str(run_dir / "checkpoint-3"), "--data",
          c.data.train_file, "--limit", "4"])
    table = capsys.readouterr().out
    assert "checkpoint-3" in table and "Acc@t1" in table and "Delta_i->c" in table


def test_eval_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint: model directory .*nowhere"):
        main(["eval", "--checkpoint", str(tmp_path / "nowhere"), "--data", "x.jsonl"])


def test_demo_runs_end_to_end_small(tmp_path):
    """The demo's pipeline with a handful of steps (the real one: `score-fast demo`)."""
    from score_fast.demo import run_demo
    table = run_demo(str(tmp_path / "demo"), warmup_steps=3, stage1_steps=1, stage2_steps=1,
                     quiet=True)
    assert list(table) == ["base", "after Stage I", "after Stage II"]
    assert all(0 <= m["acc_t1"] <= 1 and "edit_ratio" in m for m in table.values())
    run = tmp_path / "demo" / "score"
    assert (run / "config.yaml").exists() and (run / "checkpoint-2").is_dir()
    assert "Acc@t1" in (tmp_path / "demo" / "table.md").read_text()
