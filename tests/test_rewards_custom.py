"""Custom reward: "module:function" loading, the batched call, and errors naming the function."""
import math

import pytest

from score_fast.rewards import CustomReward, CustomRewardConfig, make_reward

MODULE = '''
def length_bonus(completions, answer, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def short(completions, **kwargs):
    return [1.0]

def nan(completions, **kwargs):
    return [float("nan")] * len(completions)

def inf(completions, **kwargs):
    return [0.0, float("inf")][:len(completions)]

def words(completions, **kwargs):
    return ["high"] * len(completions)

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_called_with_completions_and_row_fields(module):
    r = make_reward("custom", function="my_rewards:length_bonus")
    result = r.evaluate([" 4", "5", "x"], [{"answer": "4", "id": 0}, {"answer": "4", "id": 1},
                                           {"answer": "x", "id": 2}])
    assert result.scores == [1.0, 0.0, 1.0]
    assert result.reasons == ["ok", "zero", "ok"] and result.failures() == {"zero": 1}


def test_file_path_spec(module):
    r = CustomReward(CustomRewardConfig(function=f"{module}/my_rewards.py:length_bonus"))
    assert r.score(["4"], [{"answer": "4"}]) == [1.0]


@pytest.mark.parametrize("fn,match", [
    ("short", r"'my_rewards:short' returned 1 scores for 2 completions"),
    ("nan", r"'my_rewards:nan' returned non-finite scores at \[0, 1\]"),
    ("inf", r"'my_rewards:inf' returned non-finite scores at \[1\]"),
    ("words", r"'my_rewards:words' must return floats"),
])
def test_bad_outputs_name_the_function(module, fn, match):
    r = make_reward({"kind": "custom", "function": f"my_rewards:{fn}"})
    with pytest.raises(ValueError, match=match):
        r.score(["a", "b"], [{}, {}])


@pytest.mark.parametrize("spec,match", [
    ("my_rewards", "expected 'module:function'"),
    ("my_rewards:", "expected 'module:function'"),
    (":length_bonus", "expected 'module:function'"),
    ("my_rewards:missing", "'my_rewards:missing'.*missing"),
    ("my_rewards:NOT_A_FUNCTION", "'my_rewards:NOT_A_FUNCTION': not callable"),
    ("no_such_module_xyz:f", "'no_such_module_xyz:f'.*no_such_module_xyz"),
])
def test_bad_spec_names_the_function(module, spec, match):
    with pytest.raises(ValueError, match=match):
        make_reward("custom", function=spec)


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown reward kind 'maths'"):
        make_reward("maths")
    with pytest.raises(TypeError):
        make_reward("math", no_such_field=1)
    assert math.isfinite(make_reward("math").config.timeout_s)


def test_trl_signature_gets_prompts_and_completions_by_keyword():
    seen = {}

    def trl_reward(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, kwargs=kwargs)
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    r = make_reward("custom", function=trl_reward, problem_field="question")
    rows = [{"question": "2+2?", "answer": "4", "level": 1},
            {"question": "3+3?", "answer": "5", "level": 2}]
    assert r.evaluate(["4", "6"], rows).scores == [1.0, 0.0]
    assert seen == {"prompts": ["2+2?", "3+3?"],
                    "kwargs": {"question": ["2+2?", "3+3?"], "level": [1, 2]}}


def test_first_convention_with_a_completions_parameter_still_works():
    def strict(completions, answer):  # no **kwargs: nothing it does not name is passed
        return [float(c == a) for c, a in zip(completions, answer)]

    r = make_reward("custom", function=strict)
    assert r.evaluate(["4"], [{"answer": "4"}]).scores == [1.0]


def test_a_callable_through_the_api_trains_and_is_named_in_config_yaml(tmp_path):
    import yaml
    from helpers import make_run

    from score_fast.trainer import Trainer
    calls = []

    def parity(prompts, completions, **kwargs):
        calls.append(len(completions))
        return [float(len(c) % 2 == 0) for c in completions]

    c = make_run(tmp_path)
    c.reward.function = parity
    tr = Trainer(c)
    tr.train(until=1, progress=False)
    assert calls and sum(calls) >= 2 * c.train.prompts_per_step * c.rollout.samples_per_prompt
    saved = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    assert saved["reward"]["function"].endswith(":test_a_callable_through_the_api_trains_and_"
                                                "is_named_in_config_yaml.<locals>.parity")


def _sleeper(completions, **_):
    import time
    time.sleep(8)  # the abandoned helper thread of the test below ends with it
    return [1.0] * len(completions)


def _sleeper_catching_everything(completions, **_):
    import time
    try:
        time.sleep(8)
    except Exception:  # a user function that swallows errors does not swallow the timeout
        pass
    return [1.0] * len(completions)


@pytest.mark.parametrize("fn", [_sleeper, _sleeper_catching_everything])
def test_a_stuck_custom_reward_times_out_naming_itself(fn):
    import threading
    import time
    r = make_reward({"kind": "custom", "function": fn, "timeout_s": 0.5})
    t = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"custom reward '.*_sleeper.*' on 2 completions ran "
                                           r"past reward.timeout_s=0.5 s"):
        r.score(["a", "b"], [{}, {}])
    assert time.perf_counter() - t < 5
    out = []  # off the main thread (no SIGALRM there): a helper thread, abandoned
    th = threading.Thread(target=lambda: out.append(pytest.raises(
        TimeoutError, r.score, ["a"], [{}])))
    th.start()
    th.join(10)
    assert out and out[0].match("ran past reward.timeout_s")


def test_the_trainer_stops_on_a_stuck_reward_with_its_name():
    from score_fast.scoring import RewardError, score_episodes
    r = make_reward({"kind": "custom", "function": _sleeper, "timeout_s": 0.3})
    with pytest.raises(RewardError, match="ran past reward.timeout_s=0.3 s"):
        score_episodes(r, ["a", "b", "c"], [{}, {}, {}])
