"""The shipped recipes (score_fast/recipes/): the paper's Table 5 values, selectable by name
or file, overridable, and the defaults equal to the MATH run."""
import dataclasses

import pytest

from score_fast.cli import parse_config, recipe_names
from score_fast.config import Config
from score_fast.prompts import PromptBuilder

# Table 5 of arXiv 2409.12917 v2 (../shared/score-spec.md), and Appendix C's prompts
PAPER = {
    "math": dict(lr=5e-6, steps=3000, batch=512, temperature=1.0, alpha=10.0, beta1=0.01,
                 beta2=0.1, reward="math", prompt="math"),
    "mbpp": dict(lr=1e-5, steps=1500, batch=128, temperature=1.0, alpha=10.0, beta1=0.01,
                 beta2=0.25, reward="code", prompt="mbpp"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_is_the_papers_run(name):
    c = parse_config(["train", "--recipe", name])
    p = PAPER[name]
    assert c.train.lr == p["lr"] and c.train.weight_decay == 0.0  # Adam
    assert c.stage1.steps + c.stage2.steps == p["steps"] and c.train.rounds == 1
    assert c.train.prompts_per_step * c.rollout.samples_per_prompt == p["batch"]
    assert c.rollout.temperature == p["temperature"] and c.stage2.alpha == p["alpha"]
    assert c.stage1.beta1 == c.stage2.beta1 == p["beta1"] and c.stage1.beta2 == p["beta2"]
    assert (c.reward.kind, c.data.prompt, c.rollout.instruction) == (p["reward"], p["prompt"],
                                                                     None)
    assert c.train.kl == "k2" and c.train.baseline == "rloo" and not c.reward.lenient_math


def test_recipes_listed():
    assert recipe_names() == ["math", "mbpp"]


def test_overrides_after_the_recipe_win(tmp_path):
    c = parse_config(["train", "--recipe=mbpp", "--train.lr", "2e-5", "--model.path", "m"])
    assert (c.train.lr, c.model.path, c.stage1.beta2) == (2e-5, "m", 0.25)
    own = tmp_path / "mine.yaml"
    own.write_text("train:\n  lr: 3.0e-6\nstage1:\n  beta2: 0.5\n")
    c = parse_config(["train", "--recipe", str(own)])
    assert (c.train.lr, c.stage1.beta2) == (3e-6, 0.5)


def test_unknown_recipe():
    with pytest.raises(ValueError, match=r"--recipe 'gsm8k': not a recipe \(math, mbpp\)"):
        parse_config(["train", "--recipe", "gsm8k"])


def test_defaults_are_the_math_recipe():
    """Field for field, but data.prompt: auto (the default) resolves to math for the math
    reward, where the recipe names it."""
    default, recipe = Config(), parse_config(["train", "--recipe", "math"])
    assert PromptBuilder.from_config(default).format == recipe.data.prompt == "math"
    default.data.prompt = "math"
    assert dataclasses.asdict(default) == dataclasses.asdict(recipe)
