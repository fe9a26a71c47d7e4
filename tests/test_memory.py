"""score_fast.memory: parameter counts exact against real models and peft, the phase
formulas, the fits verdicts of the 1.5B / 7B / 14B table, load_config and `score-fast plan`."""
import json

import pytest
import torch
import transformers

from score_fast import memory
from score_fast.memory import (DEVICES, GC_AUTO_PARAMS, GiB, StepShape, count_params, fits,
                               load_config, lora_params, predict)

TINY = {
    "llama": transformers.LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2),
    # head_dim 24 != 64 / 4, biases on attention (o_proj too) and MLP, tied embeddings
    "llama_bias": transformers.LlamaConfig(vocab_size=500, hidden_size=64,
                                           intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=1,
                                           head_dim=24, attention_bias=True, mlp_bias=True,
                                           tie_word_embeddings=True),
    "qwen2_tied": transformers.Qwen2Config(vocab_size=500, hidden_size=64,
                                           intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           tie_word_embeddings=True),
    "qwen2_untied": transformers.Qwen2Config(vocab_size=500, hidden_size=48,
                                             intermediate_size=80, num_hidden_layers=3,
                                             num_attention_heads=6, num_key_value_heads=3,
                                             tie_word_embeddings=False),
}
ONE = StepShape()
PAPER_8 = StepShape(episodes=64, world=8)  # the paper's 128 x 4 episodes over 8 ranks


def _model(cfg):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", list(TINY))
def test_count_params_exact(name):
    assert count_params(TINY[name]) == sum(p.numel() for p in _model(TINY[name]).parameters())


def test_count_params_of_the_built_in_shapes():
    # each equal to sum(numel) of AutoModelForCausalLM.from_config on the meta device
    # (checked once; ~15 s to rebuild); 7.62B and 14.77B are the model cards' counts
    want = {"qwen2-0.5b": 494_032_768, "qwen2.5-0.5b": 494_032_768,
            "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
            "qwen2.5-14b": 14_770_033_664}
    assert {k: count_params(c) for k, c in memory.SHAPES.items()} == want
    assert memory.SHAPES["qwen2.5-7b"].vocab_size == 152064
    assert memory.SHAPES["qwen2.5-1.5b"].tie_word_embeddings


@pytest.mark.parametrize("name,rank,targets", [
    ("llama", 4, "all-linear"), ("llama_bias", 8, "all-linear"),
    ("qwen2_tied", 4, "all-linear"), ("qwen2_untied", 2, ["q_proj", "v_proj", "down_proj"])])
def test_lora_params_exact_against_peft(name, rank, targets):
    from peft import LoraConfig, get_peft_model
    cfg = TINY[name]
    model = get_peft_model(_model(cfg), LoraConfig(r=rank, target_modules=targets))
    want = sum(p.numel() for p in model.parameters() if p.requires_grad)
    got = lora_params(cfg, rank, (targets,) if isinstance(targets, str) else targets)
    assert got == want


def test_lora_unknown_target_is_named():
    with pytest.raises(ValueError, match="lm_head"):
        lora_params(TINY["llama"], 4, ["lm_head"])


def test_row_chunk_is_the_kernels():
    from score_fast.kernels import _lmhead
    assert memory.ROW_CHUNK == _lmhead._GPU_ROWS == _lmhead.row_chunk(10**6)


def test_full_fp32_one_rank_components():
    cfg = TINY["qwen2_untied"]
    P = count_params(cfg)
    p = predict(cfg, dtype="fp32", gradient_checkpointing=False)
    for phase in (p.rollout, p.training):
        assert (phase["master"], phase["optimizer"], phase["reference"]) == (4 * P, 8 * P, 4 * P)
        assert phase["compute_copy"] == phase["weights"] == 0  # no FSDP: the params compute
    assert (p.rollout["grads"], p.training["grads"]) == (0, 4 * P)  # set_to_none after step
    kv_tokens = 64 * 2048 + 64 * (1024 + 2048 + 64)  # 64 episodes in flight
    assert p.rollout["kv_cache"] == 2 * cfg.num_hidden_layers * 3 * 8 * 4 * kv_tokens
    assert p.training["kv_cache"] == 0 and p.host == 0


def test_full_bf16_fsdp_components():
    cfg = memory.SHAPES["qwen2.5-7b"]
    P, V, H = count_params(cfg), cfg.vocab_size, cfg.hidden_size
    layer = (P - 2 * V * H - H) // cfg.num_hidden_layers
    p = predict(cfg, shape=StepShape(world=4))
    assert p.rollout["master"] == 4 * P // 4 and p.rollout["reference"] == 2 * P // 4
    assert p.rollout["compute_copy"] == 2 * P  # gathered, not sharded, for the rollout
    assert p.training["compute_copy"] == 2 * (2 * layer + 2 * V * H + H)
    off = predict(cfg, offload=True)
    assert off.host == 16 * P and off.training["master"] == off.training["grads"] == 0


def test_monotonic():
    cfg = memory.SHAPES["qwen2.5-7b"]
    full, lora = predict(cfg), predict(cfg, lora_rank=16)
    assert lora.device_peak < full.device_peak
    assert lora.training["reference"] == 0 and lora.rollout["weights"] == 2 * count_params(cfg)
    assert predict(cfg, offload=True).device_peak < full.device_peak
    assert predict(cfg, lora_rank=16, offload=True).device_peak < lora.device_peak
    gc, no_gc = (predict(cfg, gradient_checkpointing=g) for g in (True, False))
    assert gc.training["activations"] < no_gc.training["activations"]
    assert gc.rollout == no_gc.rollout
    assert predict(cfg, shape=StepShape(in_flight=32)).device_peak < full.device_peak
    assert predict(cfg, dtype="fp32").device_peak > full.device_peak


def test_gradient_checkpointing_auto_rule():
    assert GC_AUTO_PARAMS == 1_000_000_000
    assert not predict(memory.SHAPES["qwen2.5-0.5b"]).gradient_checkpointing
    assert predict(memory.SHAPES["qwen2.5-1.5b"]).gradient_checkpointing
    assert not predict(memory.SHAPES["qwen2.5-1.5b"],
                       gradient_checkpointing=False).gradient_checkpointing


def test_table_targets_one_device():
    """The issue's targets at one rank, the default step (episodes in flight = generation
    batch = 64): 7B LoRA on 80 GB, 14B LoRA on 141 GB, 7B full bf16 with its reference on
    141 GB with the optimizer offloaded; without the offload its training phase (16P of fp32
    states = 113 GiB + a 14 GiB bf16 reference) passes the usable 131 GiB."""
    s = memory.SHAPES
    assert fits(predict(s["qwen2.5-7b"], lora_rank=16), DEVICES["80GB"])
    assert fits(predict(s["qwen2.5-14b"], lora_rank=16), DEVICES["141GB"])
    assert fits(predict(s["qwen2.5-7b"], offload=True), DEVICES["141GB"])
    full = predict(s["qwen2.5-7b"], shape=StepShape(gen_batch_size=8, in_flight=8))
    assert 127 * GiB < sum(full.training.values()) < DEVICES["141GB"]
    assert not fits(full, DEVICES["141GB"])
    assert not fits(predict(s["qwen2.5-7b"], dtype="fp32", shape=StepShape(episodes=1)),
                    DEVICES["141GB"])  # 20P = 142 GiB of states alone


def test_kv_cache_scales_with_episodes_in_flight():
    s = memory.SHAPES["qwen2.5-7b"]
    kv = [predict(s, lora_rank=16, shape=StepShape(in_flight=n)).rollout["kv_cache"]
          for n in (64, 512)]
    # 57344 bytes a token at 7B: 512 x 2048 attempt-1 tokens are 56 GiB more than 64 x 2048
    assert kv[1] - kv[0] == (512 - 64) * 2048 * 57344


def test_fits_reserve():
    p = predict(TINY["llama"])
    room = p.device_peak + memory.RESERVE
    assert fits(p, int(room / memory.HEADROOM) + 1) and not fits(p, room)


def test_plan_table_text():
    text = str(predict(memory.SHAPES["qwen2.5-7b"], lora_rank=16))
    for k in memory.COMPONENTS + ("total", "device peak"):
        assert k in text
    table = memory.plan_table()
    assert len(table.splitlines()) == 2 + 9 and "| qwen2.5-14b | LoRA r=16 bf16 |" in table


def test_load_config(tmp_path):
    cfg = load_config("qwen2.5-7b")
    assert isinstance(cfg, transformers.Qwen2Config) and cfg.hidden_size == 3584
    cfg.hidden_size = 1  # a copy: SHAPES stays intact
    assert memory.SHAPES["qwen2.5-7b"].hidden_size == 3584
    TINY["llama"].save_pretrained(tmp_path)
    for spec in (str(tmp_path), str(tmp_path / "config.json")):
        assert count_params(load_config(spec)) == count_params(TINY["llama"])


def test_load_config_errors_name_the_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such/model-xyz"):
        load_config("no-such/model-xyz")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_config(str(tmp_path))  # a directory without config.json
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="c.json"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="fp8"):
        predict(TINY["llama"], dtype="fp8")


def test_cli_plan(capsys, tmp_path):
    pytest.importorskip("jsonargparse")
    from score_fast.cli import main
    assert main(["plan", "--model", "qwen2.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "fits 80GB" in out and "fits 141GB" in out and "device peak" in out
    TINY["qwen2_tied"].save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--lora_rank", "4", "--offload", "true",
                 "--episodes", "8", "--world", "2"]) == 0
    assert "fits 80GB (79.2 GiB, 73.2 GiB usable): yes" in capsys.readouterr().out
    assert main(["plan", "--table"]) == 0
    assert "| qwen2.5-7b | full bf16 |" in capsys.readouterr().out
    assert main(["plan"]) == 2
    assert "--model" in capsys.readouterr().err


def test_checkpointing_is_on_only_where_the_step_would_not_fit():
    """The trainer's rule: a 1.5B bf16 full fine-tune at 8192 tokens (~49 GiB without
    checkpointing) needs it on a 24 GiB device, not on an 80 GB one; the reason says so."""
    cfg = memory.SHAPES["qwen2.5-1.5b"]
    on, why_on = memory.checkpointing(cfg, 24 * GiB, dtype="bf16")
    off, why_off = memory.checkpointing(cfg, DEVICES["80GB"], dtype="bf16")
    assert on and "over the 20.8 GiB usable" in why_on
    assert not off and "fits without it" in why_off
    # on a 48 GiB device: not at 8192 tokens a micro-batch, at 2048 it fits (32.9 GiB)
    assert memory.checkpointing(cfg, 48 * GiB, dtype="bf16")[0]
    assert not memory.checkpointing(cfg, 48 * GiB, dtype="bf16",
                                    shape=StepShape(max_tokens=2048, gen_batch_size=8,
                                                    in_flight=8))[0]
