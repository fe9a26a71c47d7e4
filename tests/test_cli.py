"""The score-fast command: --help lists every field with its default, YAML + dotted
overrides reach the config, the resolved config is saved, train and eval run."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from helpers import make_run
from score_fast.config import Config, EvalConfig, config_from_dict

pytest.importorskip("jsonargparse")  # the GPU image (bench/gpu_check.sh) does not have it
from score_fast.cli import main, parse_config  # noqa: E402


def _fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not
                                    dataclasses.MISSING else None):
            yield from _fields(f.default_factory, f"{prefix}{f.name}.")
        elif f.default_factory is not dataclasses.MISSING:  # a list
            yield f"{prefix}{f.name}", f.default_factory()
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
        # and what it means: the field's docstring in score_fast/config.py
        m = re.search(rf"--{re.escape(name)} \S+ (.*?) \(type:", text)
        assert m and len(m.group(1)) > 5, (name, m and m.group(1))
    assert ("--stage2.alpha ALPHA shaping bonus alpha * (r2 - r1) on attempt 2 (type: float, "
            "default: 10.0)") in text
    assert "--train.resume {true,false,null} true: continue from the last complete" in text


def test_yaml_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  path: /m\nstage2:\n  alpha: 3.0\n  steps: 7\n")
    c = parse_config(["train", "--config", str(cfg), "--stage2.alpha=5", "--train.lr=0.5"])
    assert isinstance(c, Config)
    assert (c.model.path, c.stage2.alpha, c.stage2.steps, c.train.lr) == ("/m", 5.0, 7, 0.5)
    assert c.stage1.beta2 == 0.1 and c.rollout.samples_per_prompt == 4  # defaults kept
    e = parse_config(["eval", "--checkpoint", "ck", "--data", "d.jsonl"])
    assert e == EvalConfig(checkpoint="ck", data="d.jsonl")
    import argparse
    with pytest.raises(argparse.ArgumentError, match="unrecognized arguments: --stage2.alpah"):
        parse_config(["train", "--stage2.alpah=5"])
    # no silent fallback to reinforce: the choices, listed
    with pytest.raises(argparse.ArgumentError,
                       match=r"Expected a typing.Literal\['reinforce', 'star'\]. Got value: Star"):
        parse_config(["train", "--stage2.method=Star"])
    with pytest.raises(ValueError, match="stage2.method must be reinforce or star, got 'sft'"):
        config_from_dict({"stage2": {"method": "sft"}})


def test_train_then_eval(tmp_path, capsys):
    c = make_run(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(dataclasses.asdict(c)))
    run_dir = tmp_path / "cli_run"
    # one report_to name, as typed (not a list): jsonl and tensorboard
    assert main(["train", "--config", str(cfg), f"--train.run_dir={run_dir}",
                 "--stage2.steps=1", "--stage2.alpha=5", "--train.report_to",
                 "jsonl,tensorboard"]) == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["report_to"] == ["jsonl", "tensorboard"]
    assert any(f.startswith("events.") for f in os.listdir(run_dir / "tensorboard"))
    assert saved["stage2"] == {"steps": 1, "alpha": 5.0, "beta1": 0.01, "method": "reinforce"}
    assert saved["train"]["run_dir"] == str(run_dir)
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint")) == [
        "checkpoint-2", "checkpoint-3"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    main(["eval", "--checkpoint", str(run_dir / "checkpoint-3"), "--data",
          c.data.train_file, "--limit", "4"])
    table = capsys.readouterr().out
    assert "checkpoint-3" in table and "Acc@t1" in table and "Delta_i->c" in table


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "score_fast", *args], capture_output=True,
                          text=True, timeout=120)


def test_report_to_takes_one_name():
    c = parse_config(["train", "--train.report_to", "tensorboard"])
    assert c.train.report_to == ["tensorboard"]
    with pytest.raises(ValueError, match=r"train.report_to: unknown \['tensorbord'\]"):
        parse_config(["train", "--train.report_to", "tensorbord"])


@pytest.mark.parametrize("args, hint", [
    (["train", "--train.sav", "1"], "did you mean --train.save_every?"),  # a prefix
    (["train", "--rollout.max_new_token", "4"], "did you mean --rollout.max_new_tokens?"),
    (["train", "--stage2.alpah=5", "--train.sav=1"],
     "did you mean --stage2.alpha (for --stage2.alpah), --train.save_every (for --train.sav)?"),
    (["eval", "--checkpoin", "x"], "did you mean --checkpoint?"),
    (["demo", "--se", "1"], "did you mean --seed?"),
    (["train", "--zzz", "1"], "unrecognized arguments: --zzz 1 (score-fast train --help"),
])
def test_an_option_is_its_whole_name_and_a_typo_gets_a_hint(args, hint):
    # argparse would run --train.sav 1 as --train.save_every 1
    out = _cli(*args)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.count("\n") == 1 and hint in out.stderr, out.stderr


def test_help_group_headers_are_the_sections_in_words():
    out = _cli("train", "--help")
    assert out.returncode == 0, out.stderr
    headers = [line for line in out.stdout.splitlines() if re.match(r"^\S.*:$", line)]
    sections = ["model", "model.lora", "data", "rollout", "rollout.vllm", "reward",
                "reward.sandbox", "stage1", "stage2", "train"]
    assert [h.split(":")[0] for h in headers] == ["options"] + sections, headers
    for h in headers[-len(sections):]:
        title = h.split(": ", 1)[1]
        assert len(title.split()) >= 3 and "Config(" not in title, h  # words, not a repr
    assert "Config(" not in out.stdout
    assert "rollout: sampling both attempts" in out.stdout
    assert len(out.stdout.splitlines()[0]) < 100  # the usage line: not every option


def test_eval_missing_checkpoint(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere"), "--data", "x.jsonl"]) == 2
    assert re.search("--checkpoint: model directory .*nowhere.*FileNotFoundError",
                     capsys.readouterr().err)


def test_demo_runs_end_to_end_small(tmp_path):
    """The demo's pipeline with a handful of steps (the real one: `score-fast demo`)."""
    from score_fast.demo.experiment import run_demo
    table = run_demo(str(tmp_path / "demo"), warmup_steps=3, stage1_steps=1, stage2_steps=1,
                     quiet=True)
    phases = ["base", "after Stage I", "after Stage II"]
    assert list(table) == [p for phase in phases for p in (phase, "held-out " + phase)]
    assert all(0 <= m["acc_t1"] <= 1 and "edit_ratio" in m for m in table.values())
    run = tmp_path / "demo" / "score"
    assert (run / "config.yaml").exists() and (run / "checkpoint-2").is_dir()
    text = (tmp_path / "demo" / "table.md").read_text()
    assert text.count("Acc@t1") == 2 and "held-out problems (50" in text
    from score_fast.demo.experiment import demo_rows, split_rows
    rl_rows = [json.loads(line) for line in open(tmp_path / "demo" / "problems.jsonl")]
    assert rl_rows == split_rows(demo_rows(), 50)[0]  # RL's data file: RL-train rows only


def test_demo_split_and_warmup_transcripts():
    """RL trains on the RL-train split only; the held-out split is disjoint from it, the
    same for every seed; in the warm-up transcripts a wrong attempt 1 is the row's slip
    (demo.corrupt) and attempt 2 is fixed / broken at p_fix / p_break."""
    import random

    from score_fast.demo import task as demo_task
    from score_fast.demo.experiment import corrupt, demo_rows, split_rows, warmup_transcripts
    from score_fast.rollout import Formatter
    rows = demo_rows()
    train, test = split_rows(rows, 50)
    assert len(train) == 150 and len(test) == 50
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    assert split_rows(rows, 50) == (train, test)
    tok = demo_task.build_tokenizer()
    fmt = Formatter(tok, demo_task.DEMO_INSTRUCTION)
    eps = warmup_transcripts(rows * 20, fmt, tok, random.Random(0), p_fix=0.25, p_break=0.25)
    dec = [(tok.decode(e.attempt1_ids, skip_special_tokens=True),
            tok.decode(e.attempt2_ids, skip_special_tokens=True)) for e in eps]
    right = [r["answer"] for r in rows * 20]
    assert all(a1 == y or a1 == corrupt(r) for (a1, _), y, r in zip(dec, right, rows * 20))
    wrong1 = [(a2 == y) for (a1, a2), y in zip(dec, right) if a1 != y]
    right1 = [(a2 != y) for (a1, a2), y in zip(dec, right) if a1 == y]
    assert 0.2 < sum(wrong1) / len(wrong1) < 0.3  # fixed at p_fix
    assert 0.2 < sum(right1) / len(right1) < 0.3  # broken at p_break
    assert 0.6 < len(right1) / len(dec) < 0.75  # attempt 1 right on ~68% of transcripts
