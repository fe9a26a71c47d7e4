"""The rollout engine (score_fast/sampler.py) against the reference: HF generate on the full
context, greedy. A tiny random Llama; its eos is set to a token the greedy model actually
emits, so rows end at different steps."""
import pytest
import torch
import transformers

from score_fast.sampler import TwoTurnSampler, sample_next

PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).eval()


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [3, 7, 1, 12, 5, 9, 2, 4]


def left_pad(contexts):
    """contexts (lists of ids) as one left-padded [B, width] batch and its attention mask."""
    width = max(map(len, contexts))
    ids = torch.full((len(contexts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(contexts):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


@torch.no_grad()
def ref(model, contexts, eos, n=8):
    """model.generate (greedy) on the left-padded full contexts, cut after the first eos
    (rollout.generate would also strip trailing pad ids, which this model can emit)."""
    ids, mask = left_pad(contexts)
    width = ids.shape[1]
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         pad_token_id=PAD, eos_token_id=eos)[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in gen]


def _common_eos(model, prompts):
    """A token the greedy model emits early in several rows (not first everywhere)."""
    free = ref(model, prompts, None, 8)
    counts = {}
    for row in free:
        for t in set(row[1:5]):
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


def _instructions(n):
    return [[5, 6, 7, 8][:1 + i % 4] for i in range(n)]


@pytest.mark.parametrize("batch_size,compact_at", [(64, 0.125), (3, 0.0), (64, 0.6)])
def test_greedy_two_attempts_match_generate(model, batch_size, compact_at):
    prompts = _prompts(LENGTHS)
    eos = _common_eos(model, prompts)
    s = TwoTurnSampler(model, eos, PAD, batch_size=batch_size, compact_at=compact_at)
    a1, state = s.attempt1(prompts, max_new_tokens=8, greedy=True)
    assert a1 == ref(model, prompts, eos)
    assert len({len(a) for a in a1}) > 1 and any(a[-1] == eos for a in a1)  # mixed lengths
    instr = _instructions(len(prompts))
    a2 = s.attempt2(state, instr, max_new_tokens=8, greedy=True)
    ctx = [p + a + x for p, a, x in zip(prompts, a1, instr)]
    assert a2 == ref(model, ctx, eos)
    # cache reuse: attempt 2 prefilled only the instruction tokens
    assert s.stats.summary("attempt2")["prefill_tokens"] == sum(map(len, instr))
    assert s.stats.summary("attempt1")["prefill_tokens"] == sum(map(len, prompts))
    # each generated token is fed once (attempt 1's last tokens too: they enter the cache)
    assert s.stats.summary("attempt1")["decode_tokens"] == sum(map(len, a1))
    assert s.stats.summary("attempt2")["decode_tokens"] == sum(map(len, a2)) - len(a2)


def test_finished_rows_are_dropped(model):
    prompts = _prompts(LENGTHS)
    eos = _common_eos(model, prompts)
    s = TwoTurnSampler(model, eos, PAD)
    a1, state = s.attempt1(prompts, max_new_tokens=8, greedy=True)
    decode = [f for f in s.stats.forwards if f[1] == "decode"]
    # one forward per step; its batch shrinks as rows end
    live = [f[2] for f in decode]
    slots = [f[3] for f in decode]
    assert live == sorted(live, reverse=True) and live[-1] < len(prompts)
    assert sum(live) == sum(map(len, a1))
    assert slots == sorted(slots, reverse=True) and slots[-1] < len(prompts)  # compacted
    assert all(x >= y for x, y in zip(slots, live))
    # the rows that keep running produce what they produce alone
    for p, a in zip(prompts, a1):
        alone = TwoTurnSampler(model, eos, PAD).attempt1([p], max_new_tokens=8, greedy=True)[0]
        assert alone == [a]


def test_third_turn_from_attempt2_state(model):
    """attempt2(keep=True) returns a state whose rows have pad holes (masked): a further turn
    continues from it and still matches generate on the full context."""
    prompts = _prompts(LENGTHS)
    eos = _common_eos(model, prompts)
    s = TwoTurnSampler(model, eos, PAD, batch_size=5)
    a1, st1 = s.attempt1(prompts, max_new_tokens=6, greedy=True)
    instr = _instructions(len(prompts))
    a2, st2 = s.attempt2(st1, instr, max_new_tokens=6, greedy=True, keep=True)
    a3 = s.attempt2(st2, [[9, 9]] * len(prompts), max_new_tokens=6, greedy=True)
    ctx = [p + a + x + b + [9, 9] for p, a, x, b in zip(prompts, a1, instr, a2)]
    assert a3 == ref(model, ctx, eos, 6)
    # the first state is not consumed: attempt 2 again gives the same tokens
    assert s.attempt2(st1, instr, max_new_tokens=6, greedy=True) == a2


def test_batch_of_one(model):
    p = _prompts([6])
    s = TwoTurnSampler(model, None, PAD)
    a1, state = s.attempt1(p, max_new_tokens=5, greedy=True)
    assert a1 == ref(model, p, None, 5) and len(a1[0]) == 5
    a2 = s.attempt2(state, [[9, 10]], max_new_tokens=5, greedy=True)
    assert a2 == ref(model, [p[0] + a1[0] + [9, 10]], None, 5)
    assert s.stats.summary("attempt2")["prefill_tokens"] == 2


def test_empty_attempt1(model):
    prompts = _prompts(LENGTHS)
    first = ref(model, prompts, None, 1)
    eos = first[2][0]  # row 2's first greedy token: its attempt 1 is just eos
    s = TwoTurnSampler(model, eos, PAD)
    a1, state = s.attempt1(prompts, max_new_tokens=6, greedy=True)
    assert a1[2] == [eos] and a1 == ref(model, prompts, eos, 6)
    instr = _instructions(len(prompts))
    a2 = s.attempt2(state, instr, max_new_tokens=6, greedy=True)
    assert a2 == ref(model, [p + a + x for p, a, x in zip(prompts, a1, instr)], eos, 6)


def test_stop_strings(model):
    prompts = _prompts(LENGTHS)
    free = ref(model, prompts, None, 10)

    def decode(ids):
        return "".join(f"<{i}>" for i in ids)

    stop = decode(free[1][3:5])  # two tokens of row 1
    k1 = next(k for k in range(2, 6) if stop in decode(free[1][:k]))
    s = TwoTurnSampler(model, None, PAD, decode=decode)
    a1, state = s.attempt1(prompts, max_new_tokens=10, greedy=True, stop=[stop])
    for full, got in zip(free, a1):
        text = decode(full)
        if stop in text:  # cut at the token that completes the first occurrence
            k = next(k for k in range(1, len(full) + 1) if stop in decode(full[:k]))
            assert got == full[:k]
        else:
            assert got == full
    assert a1[1] == free[1][:k1] and k1 < len(free[1])
    # per-row stop lists: only row 1 stops
    per = [[] for _ in prompts]
    per[1] = [stop]
    a1b, _ = TwoTurnSampler(model, None, PAD, decode=decode).attempt1(
        prompts, max_new_tokens=10, greedy=True, stop=per)
    assert a1b[1] == free[1][:k1] and all(a1b[i] == free[i] for i in range(len(free)) if i != 1)
    # attempt 2 after a stop-string cut continues from the cut
    instr = _instructions(len(prompts))
    a2 = s.attempt2(state, instr, max_new_tokens=4, greedy=True)
    assert a2 == ref(model, [p + a + x for p, a, x in zip(prompts, a1, instr)], None, 4)


def test_sampling_reproducible(model):
    prompts = _prompts(LENGTHS)

    def go(**kw):
        s = TwoTurnSampler(model, 7, PAD, batch_size=3)
        a1, st = s.attempt1(prompts, max_new_tokens=6, temperature=0.8, top_p=0.9, **kw)
        return a1, s.attempt2(st, _instructions(len(prompts)), max_new_tokens=6,
                              temperature=0.8, top_p=0.9, **kw)

    a = go(generator=torch.Generator().manual_seed(3))
    assert a == go(generator=torch.Generator().manual_seed(3))
    assert a != go(generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    b = go()
    torch.manual_seed(5)
    assert b == go()  # torch's global RNG


def test_top_p_and_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]] * 2000)
    g = torch.Generator().manual_seed(0)
    # a tiny nucleus keeps the argmax only
    assert sample_next(logits, greedy=False, temperature=1.0, top_p=1e-6, generator=g).eq(1).all()
    t = sample_next(logits, greedy=False, temperature=1.0, top_p=0.9, generator=g)
    assert set(t.tolist()) <= {1, 2}  # p = .84, .11, .04, .01: the nucleus is {1, 2}
    t = sample_next(logits, greedy=False, temperature=1.0, top_p=1.0, generator=g)
    assert set(t.tolist()) == {0, 1, 2, 3}
    assert sample_next(logits[:1], greedy=True, temperature=1.0, top_p=1.0,
                       generator=None).item() == 1


def test_empty_instruction_rejected(model):
    s = TwoTurnSampler(model, None, PAD)
    _, st = s.attempt1(_prompts([3]), max_new_tokens=2, greedy=True)
    with pytest.raises(ValueError, match="empty instruction"):
        s.attempt2(st, [[]], max_new_tokens=2)


def test_rollout_uses_engine_and_matches_reference_path():
    """rollout() (engine) == the old path: rollout.generate per attempt on the full context."""
    from score_fast.demo import task as demo_task
    from score_fast.rollout import Formatter, generate, rollout
    tok = demo_task.build_tokenizer()
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok)).eval()
    fmt = Formatter(tok, "Fix:")
    problems = ["1+2", "33-4", "7*8"]
    eps, timing = rollout(m, tok, fmt, problems, samples=2, max_new_tokens=6, greedy=True,
                          batch_size=4)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    kw = dict(max_new_tokens=6, temperature=1.0, greedy=True, eos=eos, pad=pad, batch_size=4)
    prompts = [e.prompt_ids for e in eps]
    a1 = generate(m, prompts, **kw)
    instr = [fmt.instruction_ids(problems[e.prompt_index], a) for e, a in zip(eps, a1)]
    a2 = generate(m, [p + a + x for p, a, x in zip(prompts, a1, instr)], **kw)
    assert [e.ids for e in eps] == [p + a + x + b for p, a, x, b in zip(prompts, a1, instr, a2)]
    assert timing["prefill_tokens"] == sum(map(len, prompts)) + sum(map(len, instr))


@pytest.mark.parametrize("mask_kind", ["eager", "2d"])
def test_other_mask_paths(model, mask_kind):
    """eager attention gets an additive 4-D mask; other implementations (flash, flex) get
    the 2-D padding mask and HF builds the rest (forced here on the sdpa model)."""
    m = model
    if mask_kind == "eager":
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=256,
                                       attn_implementation="eager")
        m = transformers.LlamaForCausalLM(cfg).eval()
    prompts = _prompts(LENGTHS)
    eos = _common_eos(m, prompts)
    s = TwoTurnSampler(m, eos, PAD)
    if mask_kind == "2d":
        s._mask_kind = "2d"
    assert s._mask_kind == mask_kind
    a1, st = s.attempt1(prompts, max_new_tokens=6, greedy=True)
    assert a1 == ref(m, prompts, eos, 6)
    instr = _instructions(len(prompts))
    a2 = s.attempt2(st, instr, max_new_tokens=6, greedy=True)
    assert a2 == ref(m, [p + a + x for p, a, x in zip(prompts, a1, instr)], eos, 6)


def _first_token_probs(model, prompt, temperature):
    with torch.no_grad():
        x = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    return torch.softmax(x / temperature, -1)


@pytest.mark.parametrize("fused", ["1", "0"])
def test_sampling_distribution_fused_and_not(model, monkeypatch, fused):
    """Sampling with top_p = 1 takes the fused LM-head sampler (SCORE_FAST_FUSED_SAMPLING
    unset or 1) or softmax + multinomial (0): either way the first token of 3000 copies of
    one prompt fits softmax(logits / T) (chi-square p > 1e-3 at a fixed seed) and not the
    softmax at twice the temperature; rows that continue are fed their own sampled token.
    The LM head is scaled x30 (logits of std ~3; the random init's are nearly uniform)."""
    import copy

    from helpers import chi_square_p
    model = copy.deepcopy(model)
    model.lm_head.weight.data *= 30
    monkeypatch.setenv("SCORE_FAST_FUSED_SAMPLING", fused)
    calls = []
    import score_fast.sampler as sm
    real = sm.linear_sample
    monkeypatch.setattr(sm, "linear_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = _prompts([5])[0]
    s = TwoTurnSampler(model, None, PAD, batch_size=3000)
    a1, _ = s.attempt1([p] * 3000, max_new_tokens=2, temperature=0.7,
                       generator=torch.Generator().manual_seed(0))
    assert len(calls) == (2 if fused == "1" else 0)
    first = torch.tensor([a[0] for a in a1])
    assert chi_square_p(first, _first_token_probs(model, p, 0.7)) > 1e-3
    assert chi_square_p(first, _first_token_probs(model, p, 1.4)) < 1e-6
    # the second token follows the first: the rows that drew token t continue from p + [t]
    t = int(first.mode().values)
    second = torch.tensor([a[1] for a in a1])[first == t]
    assert chi_square_p(second, _first_token_probs(model, p + [t], 0.7)) > 1e-3


def test_fused_sampling_reproducible_and_greedy_unchanged(model, monkeypatch):
    """The fused path is reproducible from the generator (and from torch's global RNG);
    greedy and top_p < 1 never take it."""
    import score_fast.sampler as sm
    prompts = _prompts(LENGTHS)

    def go(**kw):
        s = TwoTurnSampler(model, 7, PAD, batch_size=3)
        a1, st = s.attempt1(prompts, max_new_tokens=6, temperature=0.8, **kw)
        return a1, s.attempt2(st, _instructions(len(prompts)), max_new_tokens=6,
                              temperature=0.8, **kw)

    assert TwoTurnSampler(model, 7, PAD)._fused is not None
    a = go(generator=torch.Generator().manual_seed(3))
    assert a == go(generator=torch.Generator().manual_seed(3))
    assert a != go(generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    b = go()
    torch.manual_seed(5)
    assert b == go()
    monkeypatch.setattr(sm, "linear_sample", None)  # any use would fail
    s = TwoTurnSampler(model, 7, PAD)
    s.attempt1(prompts, max_new_tokens=3, greedy=True)
    s.attempt1(prompts, max_new_tokens=3, temperature=0.8, top_p=0.9)


def test_fused_sampling_switch(model, monkeypatch):
    """SCORE_FAST_FUSED_SAMPLING=1 on a model whose logits are not hidden @ lm_head.weight.T
    is an error naming why; unset, such a model samples the usual way; 0 turns it off."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    capped = transformers.LlamaForCausalLM(cfg).eval()
    capped.config = transformers.LlamaConfig(**cfg.to_dict(), final_logit_softcapping=30.0)
    assert TwoTurnSampler(capped, None, PAD)._fused is None
    monkeypatch.setenv("SCORE_FAST_FUSED_SAMPLING", "1")
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        TwoTurnSampler(capped, None, PAD)
    assert TwoTurnSampler(model, None, PAD)._fused is not None
    peft = pytest.importorskip("peft")  # a LoRA-wrapped head: its logits are not W h alone
    lora = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                               peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"output layer is peft\..*, not torch.nn.Linear"):
        TwoTurnSampler(lora, None, PAD)
    monkeypatch.setenv("SCORE_FAST_FUSED_SAMPLING", "0")
    assert TwoTurnSampler(model, None, PAD)._fused is None
    monkeypatch.setenv("SCORE_FAST_FUSED_SAMPLING", "yes")
    with pytest.raises(ValueError, match="must be 0, 1 or unset"):
        TwoTurnSampler(model, None, PAD)


@torch.no_grad()
def ref_sampled(model, contexts, eos, n, *, temperature, top_p, fused, generator, batch_size):
    """The sampler's random stream, without cache or compaction: batches as the sampler forms
    them (length-sorted when more rows than batch_size), per step the full left-padded
    contexts of the live rows through the model and one draw for them, in row order, from
    `generator` (sample_next on the logits, or linear_sample on the last hidden state)."""
    from score_fast.kernels.linear_sample import linear_sample
    order = list(range(len(contexts)))
    if len(contexts) > batch_size:
        order = sorted(order, key=lambda row: len(contexts[row]))
    outs = [[] for _ in contexts]
    for start in range(0, len(order), batch_size):
        live = order[start:start + batch_size]
        while live:
            ctx = [contexts[row] + outs[row] for row in live]
            ids, mask = left_pad(ctx)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            if fused:
                hidden = model.model(input_ids=ids, attention_mask=mask,
                                     position_ids=pos).last_hidden_state[:, -1]
                tokens = linear_sample(hidden, model.lm_head.weight, bias=model.lm_head.bias,
                                       temperature=temperature, generator=generator)
            else:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                tokens = sample_next(logits[:, -1], greedy=False, temperature=temperature,
                                     top_p=top_p, generator=generator)
            for row, token in zip(live, tokens.tolist()):
                outs[row].append(token)
            live = [row for row in live if outs[row][-1] != eos and len(outs[row]) < n]
    return outs


@pytest.mark.parametrize("fused,top_p", [("1", 1.0), ("0", 1.0), ("0", 0.9)])
@pytest.mark.parametrize("batch_size,compact_at", [(64, 0.6), (3, 0.0)])
def test_sampled_tokens_follow_the_reference_stream(model, monkeypatch, fused, top_p,
                                                    batch_size, compact_at):
    """Sampled (not greedy) attempts 1 and 2 equal ref_sampled's: the same draws from the
    generator in the same order, only live rows drawn for, fused or not, while rows finish
    at different steps, are compacted away and attempt 2 continues attempt 1's cache."""
    import copy
    model = copy.deepcopy(model)
    model.lm_head.weight.data *= 30  # peaked logits: the sampled eos ends rows early
    monkeypatch.setenv("SCORE_FAST_FUSED_SAMPLING", fused)
    prompts = _prompts(LENGTHS)
    eos = _common_eos(model, prompts)
    kw = dict(temperature=0.8, top_p=top_p)
    s = TwoTurnSampler(model, eos, PAD, batch_size=batch_size, compact_at=compact_at)
    assert (s._fused is not None) == (fused == "1")
    gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a1, state = s.attempt1(prompts, max_new_tokens=8, generator=gen, **kw)
    ref_kw = dict(kw, fused=fused == "1", generator=ref_gen, batch_size=batch_size)
    assert a1 == ref_sampled(model, prompts, eos, 8, **ref_kw)
    assert len({len(a) for a in a1}) > 1  # rows ended at different steps
    instr = _instructions(len(prompts))
    a2 = s.attempt2(state, instr, max_new_tokens=8, generator=gen, **kw)
    ctx = [p + a + x for p, a, x in zip(prompts, a1, instr)]
    assert a2 == ref_sampled(model, ctx, eos, 8, **ref_kw)
    assert torch.equal(gen.get_state(), ref_gen.get_state())  # nothing else drawn
