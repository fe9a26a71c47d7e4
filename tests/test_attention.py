"""Varlen attention (score_fast.attention): a packed row gives each sequence exactly what it
gets alone, forward and backward; everything else (KV-cache generation, padded batches)
is sdpa's result unchanged."""
import copy

import pytest
import torch
import transformers

from score_fast.attention import NAME, packed_mask, sequence_bounds, use_varlen_attention

LENS = [5, 1, 17, 9, 2]


def _model(kv_heads=2, **extra):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64)


def _packed(lens):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return ids, pos, cu


def test_sequence_bounds():
    _, pos, cu = _packed(LENS)
    assert sequence_bounds(pos).tolist() == cu.tolist()
    assert sequence_bounds(torch.tensor([[0]])).tolist() == [0, 1]


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("pass_bounds", ["cu", "seq_lens", None])
def test_packed_matches_each_sequence_alone(kv_heads, pass_bounds):
    alone = _model(kv_heads)
    packed = copy.deepcopy(alone)
    assert use_varlen_attention(packed) and packed.config._attn_implementation == NAME
    assert alone.config._attn_implementation == "sdpa"
    ids, pos, cu = _packed(LENS)
    # the trainer's call: host lengths and packed_mask (transformers then skips its own
    # look at position_ids)
    extra = {"cu": {"cu_seq_lens_q": cu, "max_length_q": max(LENS)},
             "seq_lens": {"seq_lens": LENS, "attention_mask": packed_mask(packed, "cpu")},
             None: {}}[pass_bounds]
    out = packed(input_ids=ids, position_ids=pos, use_cache=False, **extra).logits
    ref = torch.cat([alone(input_ids=s, use_cache=False).logits for s in ids.split(LENS, 1)], 1)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # gradients of every weight
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for (name, a), b in zip(packed.named_parameters(), alone.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_packed_control_sequences_would_leak():
    """Without sequence bounds (one long causal row), the later sequences change: the test
    above can fail."""
    m = _model()
    use_varlen_attention(m)
    ids, pos, _ = _packed(LENS)
    good = m(input_ids=ids, position_ids=pos, use_cache=False).logits
    flat = m(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits
    assert (good[0, LENS[0]:] - flat[0, LENS[0]:]).abs().max() > 1e-3


def test_generation_unchanged():
    """KV-cache decoding with a padding mask falls through to sdpa: same tokens."""
    a = _model()
    b = copy.deepcopy(a)
    use_varlen_attention(b)
    x = torch.randint(3, 97, (3, 7))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    mask[2, :1] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a.generate(x, **kw), b.generate(x, **kw))


def test_padded_batch_unchanged():
    a = _model()
    b = copy.deepcopy(a)
    use_varlen_attention(b)
    x = torch.randint(3, 97, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    torch.testing.assert_close(b(input_ids=x, attention_mask=mask).logits,
                               a(input_ids=x, attention_mask=mask).logits)


def test_bad_bounds():
    m = _model()
    use_varlen_attention(m)
    ids, pos, cu = _packed(LENS)
    bad = cu.clone()
    bad[-1] = 33
    with pytest.raises(ValueError, match="ends at 33 but the packed row has 34"):
        m(input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=bad)
    with pytest.raises(ValueError, match="seq_lens sums to 33 tokens in a batch of 1; the "
                                         "packed row has 34"):
        m(input_ids=ids, position_ids=pos, use_cache=False, seq_lens=[*LENS[:-1], 1])
    assert packed_mask(_model(), "cpu") is None  # sdpa: no marker
    with pytest.raises(ValueError, match="packed_mask needs seq_lens"):
        x = torch.zeros(2, 34, 64, dtype=torch.float64)
        m.model.layers[0].self_attn(x, attention_mask=packed_mask(m, "cpu"),
                                    position_embeddings=m.model.rotary_emb(x, pos.expand(2, -1)))


def test_switched_off(monkeypatch):
    m = _model()
    monkeypatch.setenv("SCORE_FAST_ATTN", "sdpa")
    assert not use_varlen_attention(m)
    assert m.config._attn_implementation == "sdpa"


def test_sliding_window_model_kept():
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=4, max_window_layers=0)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    assert not use_varlen_attention(m)
    assert m.config._attn_implementation != NAME


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_on_cuda_within_rule(dtype):
    """On a GPU (bf16: flash-attn varlen when installed, else torch's varlen_attn where it has
    one, else SDPA per sequence; fp32: SDPA per sequence), the trainer's call: packed
    logits and a weight's gradient vs an fp64 CPU per-sequence reference, within 2x the
    error of running each sequence alone at the same dtype with transformers' sdpa."""
    from conftest import assert_within_rule
    ref_model = _model()  # fp64 on the CPU
    ids, pos, cu = _packed(LENS)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1, sum(LENS), 97, generator=g, dtype=torch.float64)

    def logits_and_grad(model, device, packed=False):
        """Logits, and the gradient of (logits * w).sum() for layer 0's q_proj (the
        backward through attention: the trainer's path)."""
        model.zero_grad()
        if packed:
            out = model(input_ids=ids.to(device), position_ids=pos.to(device),
                        use_cache=False, cu_seq_lens_q=cu.to(device), max_length_q=max(LENS),
                        seq_lens=LENS, attention_mask=packed_mask(model, device)).logits
        else:
            out = torch.cat([model(input_ids=s.to(device), use_cache=False).logits
                             for s in ids.split(LENS, 1)], 1)
        (out.double() * w.to(device)).sum().backward()
        return out.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    ref64, ref_grad = logits_and_grad(ref_model, "cpu")
    base, base_grad = logits_and_grad(copy.deepcopy(ref_model).to("cuda", dtype), "cuda")
    packed = copy.deepcopy(ref_model).to("cuda", dtype)
    use_varlen_attention(packed)
    out, grad = logits_and_grad(packed, "cuda", packed=True)
    atol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert_within_rule(out, ref64, base, atol=atol, name=f"packed logits {dtype}")
    assert_within_rule(grad, ref_grad, base_grad, atol=atol * ref_grad.abs().max().item(),
                       name=f"packed q_proj gradient {dtype}")
