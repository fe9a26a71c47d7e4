"""model.dtype, LoRA, optimizer offload and the loading options (score_fast.models): the
bf16 step against fp64 within twice a torch bf16 run's error, fp32 master weights and a
bf16 reference, checkpoints in the model's dtype that resume exactly, LoRA with no second
model copy, merged LoRA checkpoints that load with from_pretrained, fp16 loss scaling."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from score_fast.demo import task as demo_task
from score_fast.models import load_model, resolve_dtype
from score_fast.objective import plan_objective
from score_fast.trainer import Trainer
from helpers import R1, R2, VARIANTS, fixed_episodes, hand_loss, make_run


def _local(p):
    """A parameter's full value (FSDP2 at one rank: a DTensor whose shard is the whole)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _grads(model) -> dict:
    return {n: _local(p.grad).detach().double() for n, p in model.named_parameters()
            if p.grad is not None}


class _AdaptersOff(torch.nn.Module):
    """The LoRA policy's reference, as a callable model: the base, adapters disabled."""
    def __init__(self, peft_model):
        super().__init__()
        self.m = peft_model

    def forward(self, **kw):
        with self.m.disable_adapter():
            return self.m(**kw)


def test_dtype_auto_reads_the_checkpoint(tmp_path):
    c = make_run(tmp_path)
    path = c.model.path
    assert resolve_dtype("auto", path) == torch.float32  # saved in fp32
    m = load_model(path, dtype=torch.bfloat16)
    m.save_pretrained(tmp_path / "bf16")
    assert resolve_dtype("auto", str(tmp_path / "bf16")) == torch.bfloat16
    assert resolve_dtype("fp16", path) == torch.float16
    with pytest.raises(ValueError, match="model.dtype"):
        c.model.__class__(path=path, dtype="half")


def test_bf16_step_within_twice_torch_bf16_error(tmp_path):
    """Gradients of one bf16 step (FSDP2 mixed precision at one rank: fp32 master weights
    gathered in bf16; a bf16 reference) against the fp64 objective, within 2x the error of
    the same objective run by plain torch on a bf16 copy of the model."""
    opts, stage, table = VARIANTS["stage2"]
    c = make_run(tmp_path, max_tokens=40)
    c.model.dtype = "bf16"
    tr = Trainer(c)
    assert all(p.dtype == torch.bfloat16 for p in tr.ref.parameters())
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy off the reference so that the KL is not 0
        for p in tr.policy.parameters():
            _local(p).add_(0.05 * torch.randn_like(_local(p)))
    master = {n: _local(p).detach().clone() for n, p in tr.policy.named_parameters()}
    assert all(v.dtype == torch.float32 for v in master.values())
    eps = fixed_episodes(tr.tokenizer)
    obj = plan_objective(tr.config, stage, torch.tensor(R1), torch.tensor(R2),
                         torch.tensor([0, 1, 0]))
    tr.optimizer.zero_grad()
    tr.loss_and_backward(eps, obj)
    got = _grads(tr.policy)

    def run(dtype):  # the objective by plain autograd, policy = the master weights in dtype
        pol = load_model(c.model.path, dtype=dtype)
        pol.load_state_dict({k: v.to(dtype) for k, v in master.items()}, strict=False)
        ref = load_model(c.model.path, dtype=dtype)
        ref.load_state_dict({k: v.to(dtype) for k, v in tr.ref.state_dict().items()})
        hand_loss(pol, ref, eps, table).backward()
        return _grads(pol)

    want, torch_bf16 = run(torch.float64), run(torch.bfloat16)
    assert set(got) == set(want)
    ours = max((got[n] - want[n]).abs().max().item() for n in want)
    theirs = max((torch_bf16[n] - want[n]).abs().max().item() for n in want)
    scale = max(want[n].abs().max().item() for n in want)
    assert ours <= 2 * theirs + 1e-6 * scale, (ours, theirs, scale)
    assert ours > 0  # it did compute in bf16


def test_bf16_run_checkpoints_bf16_and_resumes_exactly(tmp_path):
    from safetensors import safe_open
    c = make_run(tmp_path)
    c.model.dtype = "bf16"
    tr = Trainer(c)
    tr.train(until=2, progress=False)
    # no gradients held between steps (4 bytes a parameter during the next rollout)
    assert all(p.grad is None for p in tr.policy.parameters())
    state = tr.optimizer.state[next(iter(tr.optimizer.state))]
    assert state["exp_avg"].dtype == torch.float32
    ckpt = os.path.join(c.train.run_dir, "checkpoint-2")
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    with open(os.path.join(ckpt, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    assert resolve_dtype("auto", ckpt) == torch.bfloat16
    master = {n: _local(p).detach().clone() for n, p in tr.policy.named_parameters()}
    after = tr.train(until=3, progress=False)
    shutil.rmtree(os.path.join(c.train.run_dir, "checkpoint-3"))  # resume from step 2
    c.train.resume = True
    tr2 = Trainer(c)
    assert tr2.step == 2
    for n, p in tr2.policy.named_parameters():  # the fp32 masters, not the bf16 file
        assert torch.equal(_local(p), master[n]), n
    again = tr2.train(until=3, progress=False)
    assert again[0]["loss"] == after[0]["loss"]
    assert again[0]["grad_norm"] == after[0]["grad_norm"]


def test_offload_gives_the_same_step(tmp_path):
    runs = []
    for offload in (False, True):
        c = make_run(tmp_path)
        c.train.run_dir = str(tmp_path / f"run{offload}")
        c.model.dtype, c.model.offload_optimizer = "bf16", offload
        runs.append(Trainer(c).train(until=2, progress=False))
    for a, b in zip(*runs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


def test_lora_objective_and_no_second_copy(tmp_path):
    """LoRA: the reference is the base with the adapters off (one copy of the weights); the
    adapters' gradients match the objective written out by hand."""
    opts, stage, table = VARIANTS["stage2"]
    c = make_run(tmp_path, max_tokens=40)
    c.model.lora.rank = 4
    tr = Trainer(c)
    assert tr.ref is tr.policy
    base = sum(p.numel() for p in load_model(c.model.path).parameters())
    held = {id(p): p.numel() for m in (tr.policy, tr.ref) for p in m.parameters()}
    trainable = sum(p.numel() for p in tr.policy.parameters() if p.requires_grad)
    assert sum(held.values()) == base + trainable and 0 < trainable < base / 4
    eps = fixed_episodes(tr.tokenizer)
    obj = plan_objective(tr.config, stage, torch.tensor(R1), torch.tensor(R2),
                         torch.tensor([0, 1, 0]))
    out = tr.loss_and_backward(eps, obj)
    assert out["kl_sum1"] == out["kl_sum2"] == 0.0  # B = 0 at init: policy = reference
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in tr.policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    tr.optimizer.zero_grad()
    tr.loss_and_backward(eps, obj)
    got = _grads(tr.policy)
    assert got and all("lora_" in n for n in got)
    tr.optimizer.zero_grad()
    hand_loss(tr.policy, _AdaptersOff(tr.policy), eps, table).backward()
    for n, want in _grads(tr.policy).items():
        err = (got[n] - want).abs().max().item()
        assert err <= 2e-4 * want.abs().max().item() + 1e-8, (n, err)


def test_lora_checkpoint_merged_eval_and_resume(tmp_path):
    c = make_run(tmp_path)
    c.model.lora.rank, c.model.lora.save_merged = 4, True
    tr = Trainer(c)
    tr.train(until=2, progress=False)
    ckpt = os.path.join(c.train.run_dir, "checkpoint-2")
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", "merged"} <= files
    assert "model.safetensors" not in files  # the base is model.path's, not copied
    ids = torch.tensor([tr.formatter.prompt_ids("12+30")])
    with torch.no_grad():
        want = tr.policy(input_ids=ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "merged"))
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
        evaluated = load_model(ckpt, "--checkpoint")  # score-fast eval's loader: merges
        assert torch.allclose(evaluated(input_ids=ids).logits, want, atol=1e-5)
    adapters = {n: p.detach().clone() for n, p in tr.policy.named_parameters()
                if p.requires_grad}
    c.train.resume = True
    tr2 = Trainer(c)
    assert tr2.step == 2
    for n, p in tr2.policy.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, adapters[n]), n


def test_fp16_scales_the_loss(tmp_path):
    c = make_run(tmp_path)
    c.model.dtype = "fp16"
    tr = Trainer(c)
    assert tr.scaler is not None and all(p.dtype == torch.float16 for p in tr.ref.parameters())
    hist = tr.train(until=2, progress=False)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in hist)
    state = torch.load(os.path.join(c.train.run_dir, "checkpoint-2", "trainer_state.pt"),
                       weights_only=False)
    assert state["scaler"]["scale"] == tr.scaler.get_scale()


def _checkpointing(model) -> bool:  # the attribute's name changed in transformers 5.2x
    return getattr(model, "is_activation_checkpointing", None) or \
        model.is_gradient_checkpointing


def test_gradient_checkpointing_auto_and_forced(tmp_path):
    c = make_run(tmp_path)
    assert not _checkpointing(Trainer(c).policy)  # 0.2M parameters < 1B
    c.model.gradient_checkpointing = True
    tr = Trainer(c)
    assert _checkpointing(tr.policy)
    assert tr.train(until=1, progress=False)[0]["grad_norm"] > 0


def test_attn_implementation_passes_through(tmp_path):
    c = make_run(tmp_path)
    m = load_model(c.model.path, attn_implementation="eager")
    assert m.config._attn_implementation == "eager"


def test_hub_id_from_the_local_cache_only(tmp_path):
    """A hub id loads from the local cache (HF_HUB_CACHE layout, a branch revision too);
    one not in it is a clear error, nothing downloaded."""
    c = make_run(tmp_path)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--acme--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in os.listdir(c.model.path):
        os.link(os.path.join(c.model.path, f), snap / f)
    refs = cache / "models--acme--tiny" / "refs"
    refs.mkdir()
    (refs / "main").write_text(commit)
    (refs / "v1").write_text(commit)
    code = ("import torch; from score_fast.models import load_model, load_tokenizer\n"
            "m = load_model('acme/tiny', revision='v1'); t = load_tokenizer('acme/tiny')\n"
            "print(type(m).__name__, len(t))\n"
            "try:\n    load_model('acme/absent')\n"
            "except FileNotFoundError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"LlamaForCausalLM {len(demo_task.build_tokenizer())}")
    assert "ERR model.path: 'acme/absent' is not a local directory and not in the local " \
           "Hugging Face cache" in out.stdout


def test_lora_under_fsdp_offload_trains_saves_merged_and_resumes(tmp_path):
    """LoRA with the optimizer offloaded: the PeftModel is FSDP2's root unit (bf16 base and
    fp32 adapters in the same units), sampled through, checkpointed from a gathered state
    dict (adapters, merged/, DCP optimizer) and resumed."""
    c = make_run(tmp_path)
    c.model.dtype, c.model.offload_optimizer = "bf16", True
    c.model.lora.rank, c.model.lora.save_merged = 4, True
    tr = Trainer(c)
    assert tr.dist.fsdp and tr.ref is tr.policy
    hist = tr.train(until=2, progress=False)
    assert hist[0]["kl_t1"] == hist[0]["kl_t2"] == 0.0  # B = 0: the first step's policy = ref
    ckpt = os.path.join(c.train.run_dir, "checkpoint-2")
    assert {"adapter_model.safetensors", "merged", "optimizer"} <= set(os.listdir(ckpt))
    ids = torch.tensor([tr.formatter.prompt_ids("12+30")])
    with torch.no_grad():
        want = tr.policy(input_ids=ids).logits.float()
        merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "merged"))
        assert merged.dtype == torch.bfloat16
        # the merged bf16 weights W + BA, against the policy's bf16 base + fp32 adapters
        assert (merged(input_ids=ids).logits.float() - want).abs().max() < 0.1
    c.train.resume = True
    tr2 = Trainer(c)
    assert tr2.step == 2
    assert tr2.train(until=3, progress=False)[0]["step"] == 3
