"""MFU accounting (score_fast.flops): the FLOP count by hand, the peak lookup, and the
trainer reporting MFU when a peak is known."""
import transformers

from score_fast.flops import matmul_params, peak_flops, step_flops


def test_step_flops_by_hand():
    # N = 1000 matmul params, 2 layers of width 8, sequences of 3 and 5 tokens (T = 8):
    # policy 6*1000*8 + 6*2*8*(9+25) = 48000 + 3264; reference 2*1000*8 + 2*2*8*34 = 16000 + 1088
    assert step_flops(1000, 2, 8, [3, 5]) == 48000 + 3264 + 16000 + 1088


def test_matmul_params_counts_layers_and_head():
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=3, num_attention_heads=2,
                                   tie_word_embeddings=True)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    n, layers, hidden = matmul_params(m)
    per_layer = 4 * 16 * 16 + 3 * 16 * 32 + 2 * 16  # q k v o, gate up down, two norms
    assert (n, layers, hidden) == (3 * per_layer + 50 * 16, 3, 16)


def test_peak(monkeypatch):
    assert peak_flops("cpu") is None
    monkeypatch.setenv("SCORE_FAST_PEAK_TFLOPS", "100")
    assert peak_flops("cpu") == 1e14


def test_trainer_reports_mfu_with_a_peak(tmp_path, monkeypatch):
    from score_fast.trainer import Trainer, format_line
    from helpers import make_run
    monkeypatch.setenv("SCORE_FAST_PEAK_TFLOPS", "0.001")  # 1 GFLOP/s: a visible number
    tr = Trainer(make_run(tmp_path))
    m = tr.train(until=1, progress=False)[0]
    eps_tokens = m["train_tok_s"]  # tokens / train seconds
    assert m["mfu"] > 0 and "MFU" in format_line(m)
    n, layers, hidden = tr.flops_shape
    # at least the 8 N T part: MFU * peak * seconds >= 8 N T, with T / seconds = tok/s
    assert m["mfu"] * 1e9 >= 8 * n * eps_tokens * 0.999
    monkeypatch.delenv("SCORE_FAST_PEAK_TFLOPS")
    assert "mfu" not in Trainer(make_run(tmp_path / "b")).train(until=1, progress=False)[0]
