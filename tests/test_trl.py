"""score_fast's fused loss inside TRL's GRPOTrainer (score_fast.integrations.trl): the same
loss and gradients as TRL's own _compute_loss, held to the 2x rule against an fp64 run of
TRL's loss, for every loss type the drop-in takes; real TRL, a tiny random Llama."""
import os
import re

import pytest
import torch
import transformers

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from conftest import assert_within_rule  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from score_fast.demo import task as demo_task  # noqa: E402
from score_fast.integrations.trl import LOSS_TYPES, FusedGRPOTrainer, grpo_loss  # noqa: E402

B, P, C = 4, 7, 9  # completions, prompt and completion lengths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("trl_model")
    tok = demo_task.build_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok, hidden=32, layers=2))
    with torch.no_grad():  # a sharper head than the init's: log-probs spread over [-12, 0]
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _reward(completions, **_):  # varies across a group: nonzero advantages
    return [float(sum(map(ord, c)) % 5) for c in completions]


def _trainer(cls, model_dir, tmp_path, **over):
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=B,
                num_generations=B, max_completion_length=C, use_cpu=True, report_to=[],
                save_strategy="no", temperature=0.9, epsilon_high=0.28, beta=0.04,
                bf16=False)  # GRPOConfig's default is bf16 autocast, on a CPU too
    args.update(over)
    rows = [{"prompt": f"{i}+{i}="} for i in range(8)]
    tr = cls(model=model_dir, reward_funcs=_reward, args=GRPOConfig(**args),
             train_dataset=datasets.Dataset.from_list(rows),
             processing_class=demo_task.build_tokenizer())
    tr.model.train()
    tr.current_gradient_accumulation_steps = 2  # set by train(); divides the loss
    return tr


def _inputs(tr, seed, old):
    """A GRPO batch as _generate_and_score_completions leaves it: left-padded prompts,
    right-padded completions of different lengths (one empty), advantages, the reference's
    and (optionally) the sampling policy's log-probs near the policy's own."""
    g = torch.Generator().manual_seed(seed)
    V = tr.model.config.vocab_size
    prompt_ids = torch.randint(4, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :3] = 0
    completion_ids = torch.randint(4, V, (B, C), generator=g)
    lengths = torch.tensor([C, 5, 1, 0])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    with torch.no_grad():
        logp = tr._get_per_token_logps_and_entropies(
            tr.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), C)[0]
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask,
                  advantages=torch.randn(B, generator=g),
                  ref_per_token_logps=(logp + 0.3 * torch.randn(B, C, generator=g)) * (
                      completion_mask > 0),
                  num_items_in_batch=completion_mask.sum())
    if old:  # ratios exp(+-0.15): some clipped at (0.2, 0.28)
        inputs["old_per_token_logps"] = logp + 0.15 * torch.randn(B, C, generator=g)
    return inputs


def _loss_and_grads(tr, inputs, dtype, autocast=False):
    model = tr.model.to(dtype)
    model.zero_grad()
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = tr._compute_loss(model, cast)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
    tr.model.float()
    return loss.detach().double(), grads


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("old,bias_kl", [(False, True), (True, True), (True, False)])
def test_same_loss_and_gradients_as_trl(model_dir, tmp_path, loss_type, old, bias_kl):
    over = dict(loss_type=loss_type, use_bias_correction_kl=bias_kl)
    trl = _trainer(GRPOTrainer, model_dir, tmp_path, **over)
    ours = _trainer(FusedGRPOTrainer, model_dir, tmp_path, **over)
    inputs = _inputs(trl, seed=len(loss_type) + 3 * old + bias_kl, old=old)
    l64, g64 = _loss_and_grads(trl, inputs, torch.float64)
    l32, g32 = _loss_and_grads(trl, inputs, torch.float32)
    loss, grads = _loss_and_grads(ours, inputs, torch.float32)
    assert abs(l64.item()) > 1e-4 and g64.abs().max() > 1e-3  # not a vacuous comparison
    assert_within_rule(loss, l64, l32, atol=1e-6, name="loss")
    assert_within_rule(grads, g64, g32, atol=1e-6 * g64.abs().max().item(), name="grads")
    # the logged metrics are TRL's: kl and entropy over the same tokens
    for k in ("kl", "entropy"):
        assert ours._metrics["train"][k][-1] == pytest.approx(trl._metrics["train"][k][-1],
                                                              rel=1e-4, abs=1e-6), k
    if old:
        assert ours._metrics["train"]["clip_ratio/region_mean"][-1] == pytest.approx(
            trl._metrics["train"]["clip_ratio/region_mean"][-1], abs=1e-6)


def test_bf16_autocast_within_rule(model_dir, tmp_path):
    """Under GRPOConfig's default bf16 autocast both losses run the LM head in bf16: ours
    is held to 2x TRL's own bf16 error against TRL's fp64 loss."""
    trl = _trainer(GRPOTrainer, model_dir, tmp_path, loss_type="grpo")
    ours = _trainer(FusedGRPOTrainer, model_dir, tmp_path, loss_type="grpo")
    inputs = _inputs(trl, seed=11, old=True)
    l64, g64 = _loss_and_grads(trl, inputs, torch.float64)
    l16, g16 = _loss_and_grads(trl, inputs, torch.float32, autocast=True)
    loss, grads = _loss_and_grads(ours, inputs, torch.float32, autocast=True)
    assert (l16 - l64).abs() > 1e-5  # bf16 really ran
    assert_within_rule(loss, l64, l16, atol=1e-4, name="loss")
    assert_within_rule(grads, g64, g16, atol=1e-3 * g64.abs().max().item(), name="grads")


def test_trains_like_trl(model_dir, tmp_path):
    """Two real optimizer steps (generation, rewards, advantages, TRL's loop): the same
    losses, KL and entropy curves as GRPOTrainer's, to fp32 rounding. SGD, not AdamW: Adam's
    first step is lr * sign(g), which turns rounding noise on near-zero gradients into
    full-size, differently signed updates."""
    logs = []
    for cls in (GRPOTrainer, FusedGRPOTrainer):
        torch.manual_seed(0)
        tr = _trainer(cls, model_dir, tmp_path, max_steps=2, logging_steps=1,
                      learning_rate=0.5, optim="sgd", lr_scheduler_type="constant")
        tr.train()
        logs.append([{k: h[k] for k in ("loss", "kl", "entropy", "reward", "grad_norm")}
                     for h in tr.state.log_history if "loss" in h])
    assert len(logs[0]) == len(logs[1]) == 2
    assert logs[1][1]["kl"] > 0  # the first step moved the policy off the reference
    for a, b in zip(*logs):
        assert a["reward"] == b["reward"]  # same samples: same policy before each step
        for k in ("loss", "kl", "entropy", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("over,msg", [
    (dict(loss_type="sapo"), r"loss_type='sapo' \(supported: grpo, bnpo, dr_grpo, dapo\)"),
    (dict(top_entropy_quantile=0.5), "top_entropy_quantile=0.5"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(delta=2.0), "delta=2.0"),
    (dict(entropy_coef=0.01), "entropy bonus"),
])
def test_refuses_what_it_does_not_implement(model_dir, tmp_path, over, msg):
    with pytest.raises(ValueError, match=msg):
        _trainer(FusedGRPOTrainer, model_dir, tmp_path, **over)


def test_grpo_loss_errors():
    h, w = torch.randn(2, 3, 8), torch.randn(16, 8)
    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    adv = torch.zeros(2)
    cases = [
        (dict(hidden=h[0]), r"hidden must be \[B, T, H\].*\(3, 8\) and \(2, 3\)"),
        (dict(completion_mask=mask[:, :2]), r"completion_mask shape \(2, 2\).*\(2, 3\)"),
        (dict(advantages=torch.zeros(3)), r"advantages must be \[B\] = \[2\].*\(3,\)"),
        (dict(beta=0.1), "beta = 0.1 needs ref_logp"),
        (dict(loss_type="dr_grpo"), "needs max_completion_length"),
        (dict(loss_type="ppo"), "loss_type must be one of"),
    ]
    for over, msg in cases:
        kw = dict(hidden=h, weight=w, completion_ids=ids, completion_mask=mask, advantages=adv)
        kw.update(over)
        with pytest.raises(ValueError, match=msg):
            grpo_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("completion_ids"),
                      kw.pop("completion_mask"), kw.pop("advantages"), **kw)


def test_readme_trl_example_runs(model_dir, tmp_path, monkeypatch):
    """The README's TRL drop-in example, as written, on the tiny model."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r"<!-- trl-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    code, n = re.subn(r'^MODEL = ".*?"', f"MODEL = {model_dir!r}", code, flags=re.M)
    assert n == 1
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 2
