"""The GRPO loss inside TRL's GRPOTrainer, three ways, on the same model, batch and settings:
one `_compute_loss` (policy forward from the batch to the loss) + backward, the work one
optimizer micro-step of GRPOTrainer does besides generation.

  trl         TRL 1.16's own loss: its chunked fused log-prob head, then the loss in torch
  liger       Liger-Kernel's LigerFusedLinearGRPOLoss (chunked_loss) on the same hidden
              states, in a GRPOTrainer subclass (TRL 1.16 dropped `use_liger_loss`; this is
              what it did)
  score_fast  score_fast.integrations.trl.FusedGRPOTrainer (linear_score_loss)

    bash bench/run.sh bench/bench_trl_loss.py

Settings: loss_type dapo, beta 0.04 with the reference's log-probs, old log-probs (a second
iteration's PPO ratio), epsilon (0.2, 0.28), temperature 0.9, TRL's use_bias_correction_kl.
Before timing, the three losses are checked to agree (relative 1e-3): a faster wrong loss
would not count. CPU: a 2-layer Qwen2 body (hidden 512) under a 151,936-token vocabulary
(the LM head is 91% of the parameters), fp32; CUDA: Qwen2.5-0.5B's shape in bf16."""
import types

import pytest
import torch
import transformers

from harness import QUICK, bench_device, run

trl = pytest.importorskip("trl")
liger = pytest.importorskip("liger_kernel.chunked_loss")
datasets = pytest.importorskip("datasets")

from score_fast.demo import task as demo_task  # noqa: E402
from score_fast.integrations.trl import FusedGRPOTrainer  # noqa: E402

DEVICE = bench_device()
if QUICK:
    HIDDEN, LAYERS, VOCAB, B, P, C = 64, 1, 4096, 4, 8, 16
elif DEVICE == "cuda":
    HIDDEN, LAYERS, VOCAB, B, P, C = 896, 24, 151936, 16, 256, 1024
else:
    HIDDEN, LAYERS, VOCAB, B, P, C = 512, 2, 151936, 8, 64, 256


class LigerGRPOTrainer(trl.GRPOTrainer):
    """GRPOTrainer with Liger's fused linear GRPO loss on the backbone's hidden states."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.liger_loss = liger.LigerFusedLinearGRPOLoss(
            beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            temperature=self.temperature, use_ref_model=self.beta != 0.0,
            loss_type=self.loss_type, max_completion_length=self.max_completion_length,
            use_bias_correction_kl=self.args.use_bias_correction_kl,
            compiled=DEVICE == "cuda")  # torch.compile on a CPU: minutes of C++ builds

    def _compute_loss(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        n = inputs["completion_ids"].shape[1]
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask,
                                     use_cache=False).last_hidden_state[:, -n - 1:-1]
        normalizer = inputs["num_items_in_batch"] / self.accelerator.num_processes
        loss, _ = self.liger_loss(hidden, model.lm_head.weight, inputs["completion_ids"],
                                  inputs["completion_mask"], inputs["advantages"],
                                  ref_per_token_logps=inputs.get("ref_per_token_logps"),
                                  old_per_token_logps=inputs.get("old_per_token_logps"),
                                  num_items_in_batch=normalizer)
        return loss


TRAINERS = {"trl": trl.GRPOTrainer, "liger": LigerGRPOTrainer, "score_fast": FusedGRPOTrainer}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("trl_loss_model")
    tok = demo_task.build_tokenizer()
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=max(2, HIDDEN // 64), num_key_value_heads=2,
        max_position_embeddings=P + C, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    transformers.Qwen2ForCausalLM(cfg).to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    args = trl.GRPOConfig(
        output_dir=str(path / "out"), per_device_train_batch_size=B, num_generations=B,
        max_completion_length=C, report_to=[], save_strategy="no", beta=0.04,
        epsilon_high=0.28, temperature=0.9, use_cpu=DEVICE == "cpu",
        bf16=DEVICE == "cuda", model_init_kwargs={"dtype": dtype})
    ds = datasets.Dataset.from_list([{"prompt": "1+1="}] * B)
    trainers = {}
    for name, cls in TRAINERS.items():
        tr = cls(model=str(path), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                 args=args, train_dataset=ds, processing_class=tok)
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
        trainers[name] = tr
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(C // 2, C + 1, (B,), generator=g)
    inputs = dict(prompt_ids=torch.randint(4, VOCAB, (B, P), generator=g),
                  prompt_mask=torch.ones(B, P, dtype=torch.long),
                  completion_ids=torch.randint(4, VOCAB, (B, C), generator=g),
                  completion_mask=(torch.arange(C)[None] < lengths[:, None]).long(),
                  advantages=torch.randn(B, generator=g))
    tr = trainers["trl"]
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logp = tr._get_per_token_logps_and_entropies(tr.model.to(DEVICE), ids.to(DEVICE),
                                                     mask.to(DEVICE), C)[0].cpu()
    inputs["ref_per_token_logps"] = logp + 0.2 * torch.randn(B, C, generator=g)
    inputs["old_per_token_logps"] = logp + 0.1 * torch.randn(B, C, generator=g)
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    s = types.SimpleNamespace(trainers=trainers, inputs=inputs, losses={})
    for name in TRAINERS:  # the three agree before anything is timed
        s.losses[name] = _step(s, name).item()
    for name, value in s.losses.items():
        assert abs(value - s.losses["trl"]) <= 1e-3 * abs(s.losses["trl"]) + 1e-5, s.losses
    return s


def _step(s, name):
    tr = s.trainers[name]
    tr.model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        loss = tr._compute_loss(tr.model, s.inputs)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("provider", list(TRAINERS))
def test_trl_loss(benchmark, provider, setup):
    tokens = int(setup.inputs["completion_mask"].sum())
    run(benchmark, lambda: _step(setup, provider), device=DEVICE, provider=provider,
        baseline="trl", shape=f"B={B} prompt={P} completion<={C} H={HIDDEN} L={LAYERS} V={VOCAB}",
        dtype="bf16" if DEVICE == "cuda" else "fp32", rounds=2 if QUICK or DEVICE == "cpu" else 3,
        tokens=tokens, loss=round(setup.losses[provider], 6))
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None and stats.median > 0:
        benchmark.extra_info["tokens_per_s"] = round(tokens / stats.median)
