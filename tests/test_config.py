"""Config values are checked where they are made, before any model loads, each error naming
its field; a Trainer checks its config again (fields set after construction)."""
import dataclasses
import os

import pytest

from score_fast.config import (BASELINES, REDUCTIONS, Config, ModelConfig, RewardConfig,
                               RolloutConfig, SandboxConfig, TrainConfig, config_from_dict)


@pytest.mark.parametrize("section,field,value,match", [
    (TrainConfig, "save_every", 0, "train.save_every must be >= 1"),
    (TrainConfig, "log_every", 0, "train.log_every must be >= 1"),
    (TrainConfig, "prompts_per_step", 0, "train.prompts_per_step must be >= 1"),
    (TrainConfig, "max_tokens", -5, "train.max_tokens must be >= 1"),
    (TrainConfig, "rounds", 0, "train.rounds must be >= 1"),
    (TrainConfig, "lr", 0.0, "train.lr must be > 0"),
    (TrainConfig, "max_grad_norm", -1.0, "train.max_grad_norm must be > 0"),
    (TrainConfig, "weight_decay", -0.1, "train.weight_decay must be >= 0"),
    (TrainConfig, "reduction", "mean", "train.reduction must be one of"),
    (TrainConfig, "baseline", "grpo", "train.baseline must be one of"),
    (TrainConfig, "kl", "k4", "train.kl must be one of"),
    (RolloutConfig, "samples_per_prompt", 0, "rollout.samples_per_prompt must be >= 1"),
    (RolloutConfig, "max_new_tokens", 0, "rollout.max_new_tokens must be >= 1"),
    (RolloutConfig, "gen_batch_size", 0, "rollout.gen_batch_size must be >= 1"),
    (RolloutConfig, "episodes_in_flight", 0, "rollout.episodes_in_flight must be >= 1"),
    (RolloutConfig, "temperature", 0.0, "rollout.temperature must be > 0"),
    (RolloutConfig, "backend", "sglang", "rollout.backend must be hf or vllm"),
    (TrainConfig, "eval_every", -1, "train.eval_every must be >= 0"),
    (TrainConfig, "eval_limit", 0, "train.eval_limit must be >= 1"),
    (TrainConfig, "best_metric", "loss", "train.best_metric must be one of"),
    (RewardConfig, "workers", -1, "reward.workers must be >= 0"),
    (RewardConfig, "timeout_s", 0.0, "reward.timeout_s must be > 0"),
    (SandboxConfig, "memory_mb", 0, "reward.sandbox.memory_mb must be >= 1"),
    (SandboxConfig, "nproc", 0, "reward.sandbox.nproc must be >= 1"),
])
def test_a_bad_value_names_its_field(section, field, value, match):
    with pytest.raises(ValueError, match=match):
        section(**{field: value})


def test_rloo_needs_two_samples_a_prompt():
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2 with train.baseline"):
        Config(rollout=RolloutConfig(samples_per_prompt=1))
    Config(rollout=RolloutConfig(samples_per_prompt=1), train=TrainConfig(baseline="mean"))


def test_choices_are_the_kernels():
    from score_fast.kernels.score_advantages import BASELINES as kernel_baselines
    from score_fast.kernels.score_loss import REDUCTIONS as kernel_reductions
    assert REDUCTIONS == kernel_reductions and BASELINES == kernel_baselines


def test_trainer_checks_a_config_changed_after_construction(tmp_path):
    from score_fast.trainer import Trainer
    c = Config(model=ModelConfig(path=str(tmp_path / "no-such-model")))
    c.train.save_every = 0  # no __post_init__ ran for this
    # the value error, not the missing model: nothing was loaded first
    with pytest.raises(ValueError, match="train.save_every must be >= 1"):
        Trainer(c)


def test_round_trip_keeps_nested_sections():
    c = Config()
    c.rollout.vllm.block_size = 32
    c.model.lora.rank = 8
    again = config_from_dict(dataclasses.asdict(c))
    assert again == c


def test_resume_true_without_a_checkpoint_is_an_error(tmp_path):
    from helpers import make_run

    from score_fast.trainer import Trainer
    c = make_run(tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="train.resume=true but .* holds no complete"):
        Trainer(c)
    c.train.resume = None  # auto: nothing to resume, a fresh start
    assert Trainer(c).step == 0


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from score_fast.cli import main
    monkeypatch.delenv("SCORE_FAST_DEBUG", raising=False)
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.path is required" in err
    assert main(["train", "--model.path", "/m", "--data.train_file", "x.jsonl",
                 "--train.save_every=0"]) == 2
    assert "train.save_every must be >= 1" in capsys.readouterr().err
    # a value outside a field's choices: jsonargparse's error on one line, not the usage
    assert main(["train", "--train.reduction=mean"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'Parser key "train.reduction"' in err
    assert "Got value: mean" in err
    assert main(["train", "--nope"]) == 2
    assert capsys.readouterr().err.strip() == (
        "score-fast: error: unrecognized arguments: --nope (score-fast train --help lists every "
        "option)")
    monkeypatch.setenv("SCORE_FAST_DEBUG", "1")
    with pytest.raises(ValueError, match="model.path is required"):
        main(["train"])


def test_a_run_dir_holding_a_run_is_not_silently_reused(tmp_path):
    from helpers import make_run

    from score_fast.trainer import Trainer
    c = make_run(tmp_path, save_every=1)
    Trainer(c).train(until=2, progress=False)
    lines = open(os.path.join(c.train.run_dir, "metrics.jsonl")).readlines()
    assert len(lines) == 2
    with pytest.raises(FileExistsError, match="already holds a run .*checkpoint-1, "
                                              "checkpoint-2, metrics.jsonl"):
        Trainer(c)
    c.train.resume = None  # auto: there is a checkpoint, so continue
    assert Trainer(c).step == 2
    c.train.resume, c.train.overwrite = False, True
    tr = Trainer(c)
    assert tr.step == 0 and sorted(os.listdir(c.train.run_dir)) == ["config.yaml"]


def test_reward_settings_reach_the_reward():
    """reward.workers / timeout_s / sandbox (YAML, overrides, --help) are what the run's
    reward object is built with: math's per-check timeout, code's wall clock and limits."""
    from score_fast.rewards import make_reward_from
    c = Config(reward=RewardConfig(kind="math", workers=1, timeout_s=2.5))
    with make_reward_from(c) as r:
        assert (r.config.workers, r.config.timeout_s) == (1, 2.5)
    c = config_from_dict({"reward": {"kind": "code", "workers": 1, "timeout_s": 3.0,
                                     "sandbox": {"memory_mb": 256, "nproc": 4}}})
    with make_reward_from(c) as r:
        assert (r.config.workers, r.config.wall_s, r.config.memory_mb, r.config.nproc,
                r.config.cpu_s) == (1, 3.0, 256, 4, SandboxConfig.cpu_s)
    with make_reward_from(Config(reward=RewardConfig(kind="code"))) as r:  # the defaults
        from score_fast.rewards import CodeRewardConfig
        assert r.config.wall_s == CodeRewardConfig.wall_s


def test_values_that_would_silently_train_wrong_are_refused(tmp_path):
    """Each of these once ran without a word (issue 18): steps that train nothing, negative
    step counts, a KL weight below 0, and a token budget below the longest episode (it was
    raised silently per micro-batch); the last is checked against the run's real prompts
    and instruction, naming the numbers."""
    from score_fast.config import Stage1Config, Stage2Config
    with pytest.raises(ValueError, match="stage1.steps must be >= 0"):
        Stage1Config(steps=-3)
    with pytest.raises(ValueError, match="stage2.beta1 must be >= 0"):
        Stage2Config(beta1=-0.1)
    with pytest.raises(ValueError, match=r"stage1.steps \+ stage2.steps is 0"):
        Config(stage1=Stage1Config(steps=0), stage2=Stage2Config(steps=0))
    from helpers import make_run
    from score_fast.trainer import Trainer
    c = make_run(tmp_path, max_tokens=16)
    with pytest.raises(ValueError, match=r"train.max_tokens=16 is below the longest episode this "
                                         r"run can sample: the longest prompt \(\d+ tokens\) \+ "
                                         r"2 x rollout.max_new_tokens \(4\) \+ the instruction"):
        Trainer(c)
