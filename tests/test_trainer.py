"""The training step: turn/episode tensors, both stage objectives against a hand-computed
loss, micro-batching, rewards that fail, NaN, metrics, and a short end-to-end run."""
import collections
import json
import math
import os

import pytest
import torch
import transformers

import score_fast as sf
from helpers import R1, R2, VARIANTS, fixed_episodes, hand_loss, make_run
from score_fast.demo import task as demo_task
from score_fast.objective import Objective, build_step_tensors, plan_objective, stage_at
from score_fast.rollout import Episode
from score_fast.scoring import RewardError, score_episodes
from score_fast.trainer import NonFiniteLossError, Trainer


def test_step_tensors_target_labels():
    b = sf.pack([[10, 11, 12], [20, 21]], 16, segments=[[0, 1, 2], [0, 2]])[0]
    t = build_step_tensors(b)
    order = b.seq_index.tolist()
    per = {0: ([11, 12, 0], [1, 2, 0], [0, 0, 0]), 1: ([21, 0], [2, 0], [1, 1])}
    exp = [sum((per[i][k] for i in order), []) for k in range(3)]
    assert t["targets"].tolist() == exp[0]
    assert t["turn"].tolist() == exp[1]  # label of the TARGET token, 0 at each last position
    assert t["episode"].tolist() == exp[2]


def test_schedule_interleaves_rounds(tmp_path):
    c = make_run(tmp_path)
    c.train.rounds = 2
    assert [stage_at(c, s) for s in range(8)] == [1, 1, 2, 2, 1, 1, 2, 2]


@pytest.mark.parametrize("variant, kl, temperature", [(v, "k2", 1.0) for v in VARIANTS] + [
    ("stage1", "k3_reverse", 1.0), ("stage2", "k2", 0.6)])
def test_objective_matches_hand_computed(tmp_path, variant, kl, temperature):
    """Which tokens get which advantage and KL weight, for the paper's two stages and the
    Table 4 ablations, against the loss and gradients written out by hand; the KL option and
    the sampling temperature (log-probs of softmax(logits / T), the sampler's policy) too."""
    opts, stage, table = VARIANTS[variant]
    # 3 episodes of ~25 tokens: 3 micro-batches
    c = make_run(tmp_path, max_tokens=40, kl=kl)
    c.rollout.temperature = temperature
    tr = Trainer(c)
    c = tr.config
    c.stage2.alpha = opts.get("alpha", 10.0)
    c.stage2.method = opts.get("method", "reinforce")
    c.train.single_turn = opts.get("single_turn", False)
    with torch.no_grad():  # move the policy off the reference so that the KL is not 0
        for p in tr.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eps = fixed_episodes(tr.tokenizer)
    obj = plan_objective(c, stage, torch.tensor(R1), torch.tensor(R2), torch.tensor([0, 1, 0]))
    tr.optimizer.zero_grad()
    out = tr.loss_and_backward(eps, obj)
    got = {n: p.grad.clone() for n, p in tr.policy.named_parameters()}
    tr.optimizer.zero_grad()
    want = hand_loss(tr.policy, tr.ref, eps, table, "k2" if kl == "k2" else "k3",
                     temperature)
    want.backward()
    # fp32 k3 = exp(d) - d - 1 cancels at |d| ~ 1e-2 (3-4 of 7 digits lost), the hand
    # version runs in fp64: 2e-4 relative covers that and still catches a wrong beta or sign
    assert out["loss"] == pytest.approx(want.item(), rel=2e-4)
    trained = {k for (_, k) in table}
    assert out["n1"] == (sum(len(e.attempt1_ids) for e in eps) if 1 in trained else 0)
    for n, p in tr.policy.named_parameters():
        err = (got[n] - p.grad).abs().max().item()
        assert err <= 2e-4 * p.grad.abs().max().item() + 1e-8, f"{n}: max grad err {err:.2e}"


def test_star_step_without_corrections_trains_nothing(tmp_path):
    tr = Trainer(make_run(tmp_path, max_tokens=40))
    tr.config.stage2.method = "star"
    r1, r2 = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
    obj = plan_objective(tr.config, 2, r1, r2, torch.tensor([0, 1, 0]))
    assert not obj.train.any()
    tr.optimizer.zero_grad(set_to_none=True)
    out = tr.loss_and_backward(fixed_episodes(tr.tokenizer), obj)
    assert out["n1"] == out["n2"] == 0 and out["loss"] == 0.0
    assert all(p.grad is None for p in tr.policy.parameters())


def test_micro_batching_does_not_change_gradients(tmp_path):
    grads = []
    for budget in (40, 4096):  # 40: one ~25-token episode a micro-batch
        tr = Trainer(make_run(tmp_path, max_tokens=budget))
        eps = fixed_episodes(tr.tokenizer)
        adv = torch.tensor([[0.5, -1.0], [0.0, 2.0], [-0.5, 1.0]])
        tr.optimizer.zero_grad()
        every = torch.ones(3, 2, dtype=torch.bool)
        tr.loss_and_backward(eps, Objective(adv, every, 2, 0.01, 0.1))
        grads.append(torch.cat([p.grad.flatten() for p in tr.policy.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7), (
        (grads[0] - grads[1]).abs().max())


class _Reward:
    def __init__(self, fn):
        self.fn = fn

    def score(self, texts, rows):
        return [self.fn(t) for t in texts]


def test_reward_failing_on_one_sample_scores_zero():
    def fn(t):
        if t == "bad":
            raise RuntimeError("checker crashed")
        return 1.0
    scores, n_err, errors = score_episodes(_Reward(fn), ["a", "bad", "c"], [{}, {}, {}])
    assert scores == [1.0, 0.0, 1.0] and n_err == 1 and "checker crashed" in errors[0]


def test_reward_failure_mix_is_counted():
    """Why each zero was given (the math reward's reasons, 'exception' for a raise)."""
    from score_fast.rewards import make_reward
    from score_fast.rewards.base import Reward, RewardResult
    texts = ["Final Answer: The final answer is $4$.", "Final Answer: The final answer is $5$.",
             "no idea", "Final Answer: The final answer is $7$."]
    rows = [{"answer": "4"}, {"answer": "4"}, {"answer": "4"}, {"answer": "3"}]
    fails = collections.Counter()
    with make_reward("math") as reward:
        scores, _, _ = score_episodes(reward, texts, rows, failures=fails)
    assert scores == [1.0, 0.0, 0.0, 0.0]
    assert fails == {"wrong_answer": 2, "no_answer": 1}

    class Flaky(Reward):
        def _evaluate(self, responses, rows):
            if "boom" in responses:
                raise RuntimeError("boom")
            return RewardResult([0.0] * len(responses), ["timeout"] * len(responses))
    fails = collections.Counter()
    score_episodes(Flaky(), ["a", "boom", "c"], [{}, {}, {}], failures=fails)
    assert fails == {"timeout": 2, "exception": 1}


def test_reward_failing_everywhere_is_an_error(tmp_path):
    mod = tmp_path / "bad_reward.py"
    mod.write_text("def short(completions, **_):\n    return [1.0]\n")
    from score_fast.rewards import make_reward
    r = make_reward({"kind": "custom", "function": f"{mod}:short"})
    with pytest.raises(RewardError, match=r"bad_reward.py:short' returned 1 scores for 2"):
        score_episodes(r, ["x", "y"], [{"answer": "1"}, {"answer": "2"}])
    mod.write_text("def boom(completions, **_):\n    raise KeyError('answer')\n")
    r = make_reward({"kind": "custom", "function": f"{mod}:boom"})
    with pytest.raises(RewardError, match="failed on the batch: KeyError"):
        score_episodes(r, ["x", "y"], [{"answer": "1"}, {"answer": "2"}])


def test_nan_loss_stops_before_checkpoint(tmp_path, monkeypatch):
    tr = Trainer(make_run(tmp_path))
    before = [p.clone() for p in tr.policy.parameters()]
    monkeypatch.setattr(sf, "score_advantages",
                        lambda r1, *a, **k: torch.full((len(r1), 2), float("nan")))
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 1.*no checkpoint"):
        tr.train(progress=False)
    assert not [d for d in os.listdir(tr.run_dir) if "checkpoint" in d]
    assert all(torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))


def test_bad_inputs_name_the_problem(tmp_path):
    from score_fast.data import DataError
    c = make_run(tmp_path)
    c.model.path = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model.path: model directory .*nope"):
        Trainer(c)
    c = make_run(tmp_path)
    c.data.answer_field = "solution"
    with pytest.raises(DataError, match=r"row 1 of .*train.jsonl has no field 'solution'"):
        Trainer(c)
    c = make_run(tmp_path)
    open(c.data.train_file, "w").close()
    with pytest.raises(DataError, match="empty file"):
        Trainer(c)


def test_overlong_prompts_found_when_the_run_starts(tmp_path, monkeypatch):
    """Every row's prompt is measured before any model loads: an error naming the first rows,
    or (data.overlong=skip) the rows dropped and logged, never a failure at a later step."""
    import score_fast.trainer as trainer_module
    c = make_run(tmp_path, n_rows=12)
    rows = [json.loads(x) for x in open(c.data.train_file)]
    rows[3]["problem"] = rows[3]["problem"] * 20  # rows 4 and 9 far over a 40-token budget
    rows[8]["problem"] = rows[8]["problem"] * 20
    with open(c.data.train_file, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    c.data.max_prompt_tokens = 40

    def no_models(*a, **k):
        raise AssertionError("a model was loaded before the prompts were checked")
    monkeypatch.setattr(trainer_module, "load_model", no_models)
    with pytest.raises(ValueError, match=r"train.jsonl: 2 of 12 prompts are longer than data."
                                         r"max_prompt_tokens=40: row 4 \(\d+ tokens\), row 9"):
        Trainer(c)
    monkeypatch.undo()
    c.data.overlong = "skip"
    tr = Trainer(c)
    assert len(tr.rows) == 10 and 4 not in tr.row_numbers and 9 not in tr.row_numbers
    assert tr.row_numbers[3] == 5
    tr.train(until=1, progress=False)


def test_end_to_end_train_logs_metrics(tmp_path):
    tr = Trainer(make_run(tmp_path))
    hist = tr.train(progress=False)
    assert [m["stage"] for m in hist] == [1, 1, 2, 2]
    lines = [json.loads(x) for x in open(os.path.join(tr.run_dir, "metrics.jsonl"))]
    assert lines == hist
    for m in hist:
        # metrics wiring: binary rewards, so accuracies are the mean rewards
        # metrics of the step's samples, named as such (not the greedy eval's)
        assert m["sample_acc_t1"] == pytest.approx(m["reward_t1"])
        assert m["sample_acc_t2"] == pytest.approx(m["reward_t2"])
        assert m["sample_delta"] == pytest.approx(m["sample_delta_i2c"] - m["sample_delta_c2i"])
        assert not any(k.startswith(("acc_", "delta")) for k in m)
        assert m["temperature"] == tr.config.rollout.temperature
        assert 0 <= m["sample_edit_ratio"] <= 1 and m["kl_t1"] >= 0 and m["kl_t2"] >= 0
        assert m["gen_tok_s"] > 0 and m["train_tok_s"] > 0 and 1 <= m["len_t1"] <= 4
        V = len(tr.tokenizer)
        assert 0 < m["entropy_t1"] <= math.log(V) and 0 < m["entropy_t2"] <= math.log(V)
    assert hist[1]["kl_t1"] > 0  # after one update the policy has left the reference
    assert sorted(d for d in os.listdir(tr.run_dir) if d.startswith("checkpoint")) == [
        "checkpoint-2", "checkpoint-4"]


def test_checkpointing_chosen_by_the_memory_model_and_said(tmp_path):
    tr = Trainer(make_run(tmp_path))
    assert not tr.gradient_checkpointing and not tr.policy.is_gradient_checkpointing
    assert "gradient checkpointing off: the training phase fits without it" in \
        tr.run_summary()
    c = make_run(tmp_path)
    c.model.gradient_checkpointing = True
    tr = Trainer(c)
    assert tr.policy.is_gradient_checkpointing
    assert tr.run_summary().endswith("gradient checkpointing on: model.gradient_checkpointing")


def test_dropout_is_off_in_the_loss(tmp_path):
    """A GPT-2-style model with 10% dropout everywhere: at step 0 the policy equals the
    reference, so the KL is exactly 0 and the loss's log-probs are the sampler's (eval
    mode) -- with dropout on in the loss forward neither holds."""
    tok = demo_task.build_tokenizer()
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2,
                                  n_head=2, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model_dir = tmp_path / "gpt2"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    c = make_run(tmp_path)
    c.model.path = str(model_dir)
    tr = Trainer(c)
    assert tr.policy.config.resid_pdrop == 0.1  # the model's own config is kept
    eps = fixed_episodes(tr.tokenizer)
    obj = Objective(torch.ones(3, 2), torch.ones(3, 2, dtype=torch.bool), 2, 0.1, 0.1)
    out = tr.loss_and_backward(eps, obj)
    assert out["n1"] > 0 and out["kl_sum1"] == 0.0 and out["kl_sum2"] == 0.0
    ids = torch.tensor([eps[0].ids])
    tr.policy.train()  # as in the loss forward
    train_logits = tr.policy(input_ids=ids).logits
    tr.policy.eval()  # as in sampling
    assert torch.equal(train_logits, tr.policy(input_ids=ids).logits)


def test_step_time_breakdown_and_memory(tmp_path):
    """Each step logs where its time went (both attempts' sampling, rewards, reference and
    policy passes, optimizer, checkpoint when it saved), within the step's own time, and its
    peak memory."""
    tr = Trainer(make_run(tmp_path, save_every=2))
    hist = tr.train(until=2, progress=False)
    phases = ("attempt1", "attempt2", "rewards", "reference", "policy", "optimizer")
    for m in hist:
        for p in phases:
            assert m[f"time/{p}_s"] > 0, p
        spent = sum(v for k, v in m.items() if k.startswith("time/"))
        assert spent <= m["step_s"] * 1.001 + 1e-3
        assert spent >= 0.5 * m["step_s"]  # the named phases are most of the step
        assert m["mem/host_peak_rss_gib"] > 0.1 and m["lr"] == tr.config.train.lr
    assert "time/checkpoint_s" not in hist[0] and hist[1]["time/checkpoint_s"] > 0


def test_eval_during_training_keeps_the_best_checkpoint(tmp_path):
    """train.eval_file: greedy two-attempt metrics every eval_every steps and at the end,
    logged as eval/*; the best by train.best_metric gets a checkpoint (written at that step
    although none was due), best.json names it and keep_last never removes it; the metrics
    are those of score-fast eval's code run on that checkpoint afterwards."""
    from score_fast.evaluation import evaluate_greedy, load_task
    from score_fast.models import load_model, load_tokenizer
    c = make_run(tmp_path, save_every=100, keep_last=1, eval_every=1, eval_limit=6)
    # greedy answers are always 4 characters long: reward their characters instead, so the
    # held-out accuracy moves as the policy does
    chars = tmp_path / "chars.py"
    chars.write_text("def chars(completions, **_):\n"
                     "    return [float(sum(map(ord, c)) % 3 == 0) for c in completions]\n")
    c.reward.function = f"{chars}:chars"
    held = tmp_path / "heldout.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in demo_task.make_problems(8, seed=9)))
    c.train.eval_file = str(held)
    tr = Trainer(c)
    hist = tr.train(until=3, progress=False)
    for m in hist:
        assert m["eval/n"] == 6 and 0 <= m["eval/acc_t2"] <= 1 and m["time/eval_s"] > 0
    logged = [json.loads(x) for x in open(os.path.join(tr.run_dir, "metrics.jsonl"))]
    assert [m["eval/acc_t2"] for m in logged] == [m["eval/acc_t2"] for m in hist]
    values = [m["eval/acc_t2"] for m in hist]
    best = json.load(open(os.path.join(tr.run_dir, "best.json")))
    assert best["value"] == max(values) and best["step"] == values.index(max(values)) + 1
    assert best["checkpoint"] == f"checkpoint-{best['step']}" and best["metric"] == "acc_t2"
    kept = sorted(d for d in os.listdir(tr.run_dir) if d.startswith("checkpoint"))
    assert best["checkpoint"] in kept and len(kept) <= 2  # keep_last=1, plus the best
    # the logged numbers are score-fast eval's on the saved weights of that step
    path = os.path.join(tr.run_dir, best["checkpoint"])
    model, tok = load_model(path, "checkpoint", torch.float32), load_tokenizer(path)
    task = load_task(str(held), saved=c, limit=6)
    again = evaluate_greedy(model, tok, task, tr.eval_reward)["all"]
    assert again["acc_t2"] == best["value"] and again["n"] == 6
    # a resumed run knows the best so far; the last step evaluates (end of the schedule)
    c.train.resume = True
    tr2 = Trainer(c)
    assert tr2.best == best and tr2.step == 3
    last = tr2.train(progress=False)[-1]
    assert "eval/acc_t1" in last and os.path.isdir(os.path.join(tr.run_dir, "checkpoint-4"))


def test_a_bad_eval_file_fails_before_any_model_loads(tmp_path, monkeypatch):
    import score_fast.trainer as trainer_module
    from score_fast.data import DataError

    def no_models(*a, **k):
        raise AssertionError("a model was loaded before the eval file was checked")
    monkeypatch.setattr(trainer_module, "load_model", no_models)
    c = make_run(tmp_path)
    held = tmp_path / "heldout.jsonl"
    held.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    c.train.eval_file = str(held)
    with pytest.raises(DataError, match="heldout.jsonl: cannot evaluate"):
        Trainer(c)
    rows = demo_task.make_problems(3, seed=2)
    rows[1]["problem"] *= 30
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c.data.max_prompt_tokens = 60
    with pytest.raises(ValueError, match=r"train.eval_file .*heldout.jsonl: 1 of 3 prompts are "
                                         r"longer than data.max_prompt_tokens=60: row 2"):
        Trainer(c)


def test_entropy_is_the_policys_on_the_trained_tokens(tmp_path):
    """entropy_t1 / entropy_t2 of a step: the mean entropy of softmax(logits / T) of the
    policy at the positions that predict each attempt's tokens, as computed from its full
    logits one episode at a time."""
    c = make_run(tmp_path)
    c.rollout.temperature = 0.7
    tr = Trainer(c)
    eps = fixed_episodes(tr.tokenizer)
    want = {1: [], 2: []}
    with torch.no_grad():
        for e in eps:
            logits = tr.policy(input_ids=torch.tensor([e.ids])).logits[0].double() / 0.7
            ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
            for pos, label in enumerate(e.labels[1:]):  # position pos predicts token pos + 1
                if label in want:
                    want[label].append(ent[pos].item())
    obj = Objective(torch.ones(3, 2), torch.ones(3, 2, dtype=torch.bool), 2, 0.1, 0.1,
                    temperature=0.7)  # the whole loss spec: the sampling temperature too
    out = tr.loss_and_backward(eps, obj)
    for k in (1, 2):
        assert out[f"n{k}"] == len(want[k])
        got = out[f"ent_sum{k}"] / out[f"n{k}"]
        assert got == pytest.approx(sum(want[k]) / len(want[k]), rel=1e-5), k


def _attempt1_only(episodes):
    """The episodes a train.single_turn step samples: [prompt | attempt 1], nothing after."""
    return [Episode(e.prompt_index, e.prompt_ids, e.attempt1_ids, []) for e in episodes]


def test_single_turn_step_samples_scores_and_forwards_attempt1_only(tmp_path, monkeypatch):
    """A train.single_turn step never asks for an instruction, an attempt 2 or its reward:
    zero attempt-2 tokens generated, one reward call (attempt 1's texts), packed batches of
    prompt + attempt 1 only (no turn-2 rows), and no attempt-2 metric (not even as 0)."""
    import score_fast.trainer as trainer_module
    from score_fast.rollout import Formatter
    from score_fast.sampler import TwoTurnSampler
    from score_fast.trainer import ATTEMPT2_KEYS, format_line

    def never(*a, **k):
        raise AssertionError("a single_turn step asked for attempt 2")
    tr = Trainer(make_run(tmp_path, single_turn=True))
    monkeypatch.setattr(TwoTurnSampler, "attempt2", never)
    monkeypatch.setattr(Formatter, "instruction_ids", never)
    scored, seen = [], {}
    real_score = trainer_module.score_episodes
    monkeypatch.setattr(trainer_module, "score_episodes",
                        lambda reward, texts, *a, **k: scored.append(list(texts))
                        or real_score(reward, texts, *a, **k))
    real_rollouts, real_loss = tr.rollouts, tr.loss_and_backward

    def rollouts(step):
        eps, rows, timing = real_rollouts(step)
        seen.update(episodes=eps, timing=timing)
        return eps, rows, timing

    def loss_and_backward(eps, objective):
        seqs = [e.ids for e in eps]
        seen["batches"] = sf.pack(seqs, tr.config.train.max_tokens,
                                  segments=[e.labels for e in eps])
        seen["out"] = real_loss(eps, objective)
        return seen["out"]
    tr.rollouts, tr.loss_and_backward = rollouts, loss_and_backward
    m = tr.train_step()
    eps, timing, out = seen["episodes"], seen["timing"], seen["out"]
    n1 = sum(len(e.attempt1_ids) for e in eps)
    assert len(eps) == 6 and n1 > 0
    assert all(e.instruction_ids == [] and e.attempt2_ids == [] and e.text2 == "" for e in eps)
    assert all(e.ids == e.prompt_ids + e.attempt1_ids for e in eps)
    # nothing of attempt 2 generated: no seconds, no tokens, no attempt-2 prefill or decode
    assert timing["attempt2_seconds"] == 0 and timing["gen_tokens"] == n1
    assert timing["decode_tokens"] <= n1
    assert timing["prefill_tokens"] <= sum(len(e.prompt_ids) for e in eps)
    assert scored == [[e.text1 for e in eps]]  # one reward call: attempt 1's texts
    # the packed step: prompt + attempt 1 only, no turn-2 row anywhere
    assert out["tokens"] == sum(len(e.prompt_ids) + len(e.attempt1_ids) for e in eps)
    assert out["n1"] == n1 and out["n2"] == 0
    for b in seen["batches"]:
        assert 2 not in b.segment_ids.tolist()[0]
        assert 2 not in build_step_tensors(b)["turn"].tolist()
    # metrics: attempt 1's, and no attempt-2 key at all
    t2 = [k for k in m if "_t2" in k or k.startswith(("sample_delta", "sample_edit"))
          or k == "time/attempt2_s"]
    assert not t2 and not set(ATTEMPT2_KEYS) & set(m)
    assert m["sample_acc_t1"] == pytest.approx(m["reward_t1"]) and m["kl_t1"] == 0.0
    assert m["time/attempt1_s"] > 0 and m["len_t1"] == n1 / 6 and m["reward_errors"] == 0
    line = format_line(m)
    assert "(attempt 1 only)" in line and " r2 " not in line and "t2" not in line


def test_single_turn_packs_less_and_trains_attempt1_as_the_two_turn_path_did(tmp_path):
    """The same attempt-1 tokens, objective and policy: the attempt-1-only episodes give the
    loss and gradients the old path (whole four-part episodes, attempt 2 masked out by
    Objective.train) gave, and score_loss's on the policy's log-probs of those tokens, from
    fewer packed tokens with no turn-2 labels."""
    c = make_run(tmp_path, max_tokens=40, single_turn=True)
    tr = Trainer(c)
    with torch.no_grad():  # move the policy off the reference so that the KL is not 0
        for p in tr.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    full = fixed_episodes(tr.tokenizer)
    short = _attempt1_only(full)
    group = torch.tensor([0, 1, 0])
    obj = plan_objective(c, 2, torch.tensor(R1), None, group)
    assert obj.stage == 2 and obj.beta1 == c.stage2.beta1 and obj.beta2 == 0.0
    assert obj.train.tolist() == [[True, False]] * 3
    assert torch.equal(obj.adv, plan_objective(c, 2, torch.tensor(R1), torch.tensor(R2),
                                               group).adv)  # r2 was never read
    grads, outs = {}, {}
    for name, eps in (("old", full), ("new", short)):
        tr.optimizer.zero_grad(set_to_none=True)
        outs[name] = tr.loss_and_backward(eps, obj)
        grads[name] = {n: p.grad.clone() for n, p in tr.policy.named_parameters()}
    old, new = outs["old"], outs["new"]
    assert new["tokens"] == sum(len(e.ids) for e in short) < old["tokens"] == sum(
        len(e.ids) for e in full)
    assert new["n1"] == old["n1"] == sum(len(e.attempt1_ids) for e in full) and new["n2"] == 0
    assert new["loss"] == pytest.approx(old["loss"], rel=1e-5)
    assert new["kl_sum1"] == pytest.approx(old["kl_sum1"], rel=1e-4)
    for n, g in grads["new"].items():
        torch.testing.assert_close(g, grads["old"][n], rtol=1e-4, atol=1e-7, msg=n)
    # score_loss on the same attempt-1 tokens (per episode, full logits at T = 1)
    logp, ref_logp, turn, episode = [], [], [], []
    for i, e in enumerate(short):
        ids = torch.tensor([e.ids])
        tgt = ids[0, 1:]
        logp.append(torch.log_softmax(tr.policy(input_ids=ids).logits[0, :-1], -1)
                    .gather(1, tgt[:, None])[:, 0])
        with torch.no_grad():
            ref_logp.append(torch.log_softmax(tr.ref(input_ids=ids).logits[0, :-1], -1)
                            .gather(1, tgt[:, None])[:, 0])
        turn.append(torch.tensor(e.labels[1:]))
        episode.append(torch.full((len(tgt),), i))
    tr.optimizer.zero_grad(set_to_none=True)
    want, _ = sf.score_loss(torch.cat(logp), torch.cat(ref_logp), torch.cat(turn),
                            torch.cat(episode), obj.adv, stage=2, beta1=obj.beta1, beta2=0.0,
                            kl="k2")
    want.backward()
    assert new["loss"] == pytest.approx(want.item(), rel=1e-5)
    for n, p in tr.policy.named_parameters():
        torch.testing.assert_close(grads["new"][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_single_turn_run_logs_resumes_evaluates_and_plots(tmp_path):
    """A train.single_turn run end to end: metrics.jsonl without attempt-2 keys, samples
    without attempt 2, held-out evaluation still of both attempts (eval/acc_t2, as Table 4
    measures the ablation), a resume from its checkpoint that continues exactly as the
    uninterrupted run, and `score-fast plot` of its metrics."""
    from score_fast.cli import main
    c = make_run(tmp_path, single_turn=True, save_every=2, eval_every=2, eval_limit=4,
                 log_samples_every=1, log_samples=2)
    held = tmp_path / "heldout.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in demo_task.make_problems(6, seed=9)))
    c.train.eval_file = str(held)
    whole = Trainer(c).train(progress=False)
    run = c.train.run_dir
    lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert lines == whole and [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:
        assert not [k for k in m if k.endswith("_t2") and not k.startswith("eval/")]
        assert "sample_delta" not in m and "time/attempt2_s" not in m
    evaluated = [m for m in lines if "eval/acc_t2" in m]
    assert [m["step"] for m in evaluated] == [2, 4]
    for m in evaluated:
        assert m["eval/delta"] == pytest.approx(m["eval/acc_t2"] - m["eval/acc_t1"])
    samples = [json.loads(x) for x in open(os.path.join(run, "samples.jsonl"))]
    assert len(samples) == 8 and all(set(s) == {"step", "problem", "attempt1", "r1"}
                                     for s in samples)
    # resume from checkpoint-2 in a fresh run dir: the same steps 3 and 4
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil
    shutil.copytree(os.path.join(run, "checkpoint-2"), resumed / "checkpoint-2")
    c.train.run_dir, c.train.resume = str(resumed), True
    tr = Trainer(c)
    assert tr.step == 2
    again = tr.train(progress=False)
    assert [m["step"] for m in again] == [3, 4]
    for a, b in zip(again, whole[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["reward_t1"] == b["reward_t1"] and a["len_t1"] == b["len_t1"]
    out = tmp_path / "curves.png"
    assert main(["plot", run, "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_single_turn_episode_budget_is_prompt_plus_attempt1(tmp_path):
    """train.max_tokens must hold the longest episode a run samples: a single_turn run's is
    the longest prompt + attempt 1 (no instruction, no attempt 2)."""
    import re
    with pytest.raises(ValueError, match="below the longest episode") as e:
        Trainer(make_run(tmp_path, max_tokens=10))
    prompt = int(re.search(r"longest prompt \((\d+) tokens\)", str(e.value)).group(1))
    budget = prompt + 4  # rollout.max_new_tokens = 4
    with pytest.raises(ValueError, match="instruction"):
        Trainer(make_run(tmp_path, max_tokens=budget))
    with pytest.raises(ValueError, match=rf"\({prompt} tokens\) \+ rollout.max_new_tokens "
                                         rf"\(4\) = {budget} \(train.single_turn"):
        Trainer(make_run(tmp_path, max_tokens=budget - 1, single_turn=True))
    tr = Trainer(make_run(tmp_path, max_tokens=budget, single_turn=True))
    assert tr.train_step()["len_t1"] > 0


def test_rollout_engine_slots_trains_and_names_what_it_cannot_run(tmp_path):
    """rollout.engine=slots: the step samples through SlotEngine (both attempts in the same
    steps: one time/attempts_s phase) and trains; auto on a CPU keeps the sampler; a model
    SlotEngine cannot run is named when the run starts."""
    c = make_run(tmp_path / "slots", save_every=100)
    c.rollout.engine = "slots"
    tr = Trainer(c)
    assert tr.slots is not None
    hist = tr.train(until=2, progress=False)
    assert all(m["time/attempts_s"] > 0 and "time/attempt1_s" not in m for m in hist)
    assert all(m["len_t1"] > 0 and m["len_t2"] > 0 for m in hist)
    assert Trainer(make_run(tmp_path / "auto", save_every=100)).slots is None  # a CPU
    c = make_run(tmp_path / "gpt2", save_every=100)
    c.rollout.engine = "slots"
    tok = tr.tokenizer
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok)))
    with pytest.raises(ValueError, match="rollout.engine=slots: SlotEngine cannot run this "
                                         "model: model_type 'gpt2'"):
        Trainer(c, model=gpt2, tokenizer=tok)


class _DeviceReads:
    """Counts the reads of device data onto the host while it is active, as a GPU would
    pay them: values derived from the model's parameters or from what the trainer copied
    to the device (Trainer._to_device, a clone here so that the copy is its own tensor) that
    reach the host (item, bool, int, tolist, numpy, nonzero, boolean indexing, ...)."""
    SYNC_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select",
                "_unique", "repeat_interleave")
    HOST_READS = ("tolist", "cpu")  # .numpy() of a device tensor raises

    def __init__(self, roots):
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakTensorKeyDictionary
        self.tracked = WeakTensorKeyDictionary()
        for t in roots:
            self.tracked[t] = True
        self.names = collections.Counter()
        outer = self

        def tracked(args):
            return any(isinstance(a, torch.Tensor) and a in outer.tracked
                       for a in tree_flatten(args)[0])

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if tracked((args, kwargs)):
                    name = func.__name__.split(".")[0]
                    if name in outer.SYNC_OPS:
                        outer.names[name] += 1
                    for t in tree_flatten(out)[0]:
                        if isinstance(t, torch.Tensor):
                            outer.tracked[t] = True
                return out

        class Reads(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in outer.HOST_READS and tracked(args[:1]):
                    outer.names[name] += 1
                return func(*args, **(kwargs or {}))

        self.modes = (Reads(), Ops())

    def add(self, t):
        self.tracked[t] = True
        return t

    def __enter__(self):
        for m in self.modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)


def test_a_training_step_reads_the_device_once(tmp_path, monkeypatch):
    """loss_and_backward over 3 micro-batches (reference forward, policy forward + backward,
    the loss statistics): one read of device values for the whole step (the statistics'
    table), none a micro-batch: the bounds, trained rows and attempt sizes come from the
    host, the kernels' value checks are the trainer's own on the host."""
    tr = Trainer(make_run(tmp_path, max_tokens=40))
    assert tr.policy.config._attn_implementation == "score_fast_varlen"
    eps = fixed_episodes(tr.tokenizer)
    obj = plan_objective(tr.config, 2, torch.tensor(R1), torch.tensor(R2),
                         torch.tensor([0, 1, 0]))
    counter = _DeviceReads([*tr.policy.parameters(), *tr.ref.parameters()])
    monkeypatch.setattr(tr, "_to_device", lambda t: counter.add(t.clone()))
    tr.optimizer.zero_grad()
    with counter:
        out = tr.loss_and_backward(eps, obj)
    assert out["tokens"] > 80  # 3 micro-batches of <= 40 tokens
    assert sum(counter.names.values()) == 1, counter.names
    # and the counter sees a read: the old per-micro-batch statistics
    with counter:
        torch.stack([p.sum() for p in tr.policy.parameters()]).sum().item()
    assert sum(counter.names.values()) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_step_on_cuda_synchronizes_once(tmp_path):
    """The same on a GPU, counted by CUDA itself: torch.cuda's sync debug mode warns at every
    synchronizing call; a step (after a warm-up one) makes one, the statistics' read."""
    import warnings
    tr = Trainer(make_run(tmp_path, max_tokens=40))
    assert tr.device.type == "cuda"
    eps = fixed_episodes(tr.tokenizer)
    obj = plan_objective(tr.config, 2, torch.tensor(R1), torch.tensor(R2),
                         torch.tensor([0, 1, 0]))
    tr.loss_and_backward(eps, obj)  # allocations, Triton compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tr.loss_and_backward(eps, obj)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
