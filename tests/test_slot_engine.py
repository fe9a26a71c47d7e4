"""The static-slot decode engine (score_fast/slot_engine.py) against its references: greedy
tokens of both attempts equal model.generate on the full context and score_fast.sampler
(eos mid-batch, both instruction variants, bucket compaction, shared prefill, 1-token
prompts); sampled tokens chi-square-equal to softmax sampling; and the step is one graph:
torch.compile(fullgraph=True) with 0 graph breaks and scalar outputs disallowed, no host
sync inside a step, every buffer's data_ptr unchanged across steps."""
import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import chi_square_p
from score_fast.sampler import TwoTurnSampler
from score_fast.slot_engine import DONE, SlotEngine, gumbel_noise, unsupported

PAD, V = 0, 100
INSTR = ([10, 11], [7, 8, 9])  # (attempt 1 not ended by eos, ended by eos)


def _model(kind="llama", **extra):
    torch.manual_seed(0)
    # initializer_range 0.3 (not 0.02): attention then matters to the next token, so a
    # slot that misses a column of its context decodes other tokens (at 0.02 the greedy
    # token is mostly a function of the current one)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.3)
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=8, **extra)
        return transformers.Qwen3ForCausalLM(cfg).eval().double()
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, **extra)
                                             ).eval().double()
    # fp64: greedy ties between the two computations' last bits cannot flip a token
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **extra)
                                         ).eval().double()


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [3, 7, 1, 12, 5, 9, 2, 4]


@torch.no_grad()
def _generate(model, contexts, eos, n):
    """model.generate, greedy, on left-padded full contexts; cut after the first eos."""
    width = max(map(len, contexts))
    ids = torch.full((len(contexts), width), PAD)
    mask = torch.zeros_like(ids)
    for r, c in enumerate(contexts):
        ids[r, width - len(c):], mask[r, width - len(c):] = torch.tensor(c), 1
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                         do_sample=False, pad_token_id=PAD, eos_token_id=eos)[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in gen]


def _eos(model, prompts):
    """A token the greedy model emits early in some rows, so attempts end mid-batch."""
    counts = {}
    for row in _generate(model, prompts, None, 6):
        for t in set(row[1:4]):
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


def _reference(model, prompts, eos, n, pair=INSTR):
    """Both attempts greedy by model.generate on the full context, the instruction variant
    picked by whether attempt 1 ended with eos."""
    a1 = _generate(model, prompts, eos, n)
    instr = [pair[bool(a) and a[-1] == eos] for a in a1]
    a2 = _generate(model, [p + a + i for p, a, i in zip(prompts, a1, instr)], eos, n)
    return a1, a2


# check_every 1: a compaction at every bucket crossed; col_block 4: the attention window
# grows every few steps (and 64: one window, the whole capacity)
@pytest.mark.parametrize("check_every, col_block", [(1, 4), (4, 64), (3, 16)])
def test_greedy_both_attempts_equal_generate_and_the_sampler(model, check_every, col_block):
    prompts = _prompts(LENGTHS)
    eos = _eos(model, prompts)
    a1, a2 = _reference(model, prompts, eos, 8)
    assert any(a and a[-1] == eos for a in a1) and any(len(a) == 8 for a in a1)
    engine = SlotEngine(model, eos, PAD, check_every=check_every, col_block=col_block)
    b1, b2, info = engine.episodes(prompts, [INSTR] * len(prompts), max_new_tokens=8,
                                   greedy=True)
    assert (b1, b2) == (a1, a2)
    instr = [INSTR[bool(a) and a[-1] == eos] for a in a1]
    assert info["decode_tokens"] == sum(map(len, a1 + a2 + instr))
    assert info["prefill_tokens"] == sum(len(p) - 1 for p in set(map(tuple, prompts)))
    if check_every == 1:
        assert engine.stats["compactions"] >= 1
    sampler = TwoTurnSampler(model, eos, PAD, batch_size=8)
    s1, state = sampler.attempt1(prompts, max_new_tokens=8, greedy=True)
    s2 = sampler.attempt2(state, [INSTR[bool(a) and a[-1] == eos] for a in s1],
                          max_new_tokens=8, greedy=True)
    assert (s1, s2) == (b1, b2)


def test_shared_prefill_waves_and_single_attempt(model):
    # 3 samples of each prompt: its prefill runs once; 5 slots: two waves
    base = _prompts([6, 1, 9])
    prompts = [p for p in base for _ in range(3)]
    eos = _eos(model, base)
    a1, a2 = _reference(model, prompts, eos, 6)
    engine = SlotEngine(model, eos, PAD, max_slots=5)
    assert engine.episodes(prompts, [INSTR] * 9, max_new_tokens=6, greedy=True)[:2] == (a1, a2)
    # each wave prefills its distinct prompts but their last tokens once: wave 1 holds
    # prompt 0 x 3 and prompt 1 x 2 (5 + 0 tokens), wave 2 prompt 1 and prompt 2 x 3 (0 + 8)
    assert engine.stats["prefill_tokens"] == 5 + 0 + 0 + 8
    one, none, _ = engine.episodes(prompts, max_new_tokens=6, greedy=True, attempts=1)
    assert one == a1 and none == [[]] * 9


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_other_families(kind):
    m = _model(kind)
    prompts = _prompts([4, 8, 2])
    eos = _eos(m, prompts)
    assert SlotEngine(m, eos, PAD).episodes(prompts, [INSTR] * 3, max_new_tokens=5,
                                            greedy=True)[:2] == _reference(m, prompts, eos, 5)


def test_unsupported_models_named():
    m = _model("qwen2", use_sliding_window=True, sliding_window=4,
               layer_types=["sliding_attention"] * 2)
    assert unsupported(m) == "sliding-window attention layers"
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16,
                                                                n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="model_type 'gpt2' is not one of llama"):
        SlotEngine(gpt2, 1, 0)


def test_bad_input():
    engine = SlotEngine(_model(), 5, PAD)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.episodes([[3], []], [INSTR] * 2, max_new_tokens=2)
    with pytest.raises(ValueError, match="1 instruction pairs for 2 prompts"):
        engine.episodes([[3], [4]], [INSTR], max_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty id lists"):
        engine.episodes([[3]], [([], [1])], max_new_tokens=2)


def _peaked():
    """A 1-layer model whose next-token distribution after [3, 4, 5] is peaked, and those
    fp64 logits."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # a peaked distribution, not near-uniform
        logits = m(torch.tensor([[3, 4, 5]])).logits[0, -1].double()
    return m, logits


def _nucleus(probs, top_p=1.0, top_k=0):
    """The target distribution written out: the k most likely, then the smallest prefix of
    the sorted probabilities whose mass before each kept token is <= top_p, renormalized."""
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for rank, v in enumerate(order.tolist()):
        if (top_k and rank >= top_k) or mass > top_p:
            break
        keep[v] = True
        mass += probs[v].item()
    out = torch.where(keep, probs, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("top_p, top_k", [(1.0, 0), (0.6, 0), (1.0, 3), (0.9, 4)])
def test_sampled_tokens_follow_softmax(top_p, top_k):
    """One decode step's token over many episodes (each its own noise) against
    softmax(logits / T) of the same step, with a temperature, restricted to the nucleus and
    the top k where asked."""
    m, logits = _peaked()
    probs = _nucleus(torch.softmax(logits / 0.7, -1), top_p, top_k)
    assert (probs > 0).sum() >= 2 and ((probs > 0).sum() < 12 or top_p == 1.0)
    engine = SlotEngine(m, None, PAD, max_slots=512)
    kw = dict(max_new_tokens=1, temperature=0.7, attempts=1, seed=123, top_p=top_p,
              top_k=top_k)
    a1, _, _ = engine.episodes([[3, 4, 5]] * 4000, **kw)
    tokens = torch.tensor([a[0] for a in a1])
    assert chi_square_p(tokens, probs) > 1e-3
    # the draw is a function of (seed, episode): the same seed gives the same tokens
    assert engine.episodes([[3, 4, 5]] * 4000, **kw)[0] == a1


def _text(ids):
    return "".join(chr(65 + i % 26) for i in ids)


@pytest.mark.parametrize("check_every", [1, 3, 5, 8])
def test_stop_strings_rewind_the_slot_as_the_sampler_cuts(model, check_every):
    """An attempt ends after the token that completes a stop string (the sampler's rule);
    attempt 1 cut mid-way restarts the instruction from there, whatever the look interval
    (up to 8 steps after the stop)."""
    prompts = _prompts(LENGTHS)
    eos = _eos(model, prompts)
    # the variant after a cut attempt 1 (no eos) the longer: a rewind found late then needs
    # more steps than the longest episode without stop strings
    pair = ([10, 11, 12], [7])
    a1, a2 = _reference(model, prompts, eos, 8, pair)
    # a stop inside a long attempt 1, one at the end of another (found up to check_every
    # steps later: past max_new_tokens + 1 steps at 5) and one inside some attempt 2
    long1 = [a for a in a1 if len(a) == 8]
    long2 = next(a for a in a2 if len(a) >= 6)
    stops = [_text(long1[0][2:4]), _text(long1[-1][5:7]), _text(long2[3:5])]
    sampler = TwoTurnSampler(model, eos, PAD, batch_size=8, decode=_text)
    s1, state = sampler.attempt1(prompts, max_new_tokens=8, greedy=True, stop=stops)
    s2 = sampler.attempt2(state, [pair[bool(a) and a[-1] == eos] for a in s1],
                          max_new_tokens=8, greedy=True, stop=stops)
    assert sum(map(len, s1)) < sum(map(len, a1)) and s2 != a2  # both attempts cut somewhere
    engine = SlotEngine(model, eos, PAD, check_every=check_every, decode=_text)
    b1, b2, _ = engine.episodes(prompts, [pair] * 8, max_new_tokens=8, greedy=True,
                                stop=stops)
    assert (b1, b2) == (s1, s2)
    # one list a prompt: only the first prompt stops
    per = [stops] + [[]] * 7
    c1, _, _ = engine.episodes(prompts, [pair] * 8, max_new_tokens=8, greedy=True, stop=per)
    assert c1[1:] == a1[1:]
    with pytest.raises(ValueError, match="decode="):
        SlotEngine(model, eos, PAD).episodes(prompts, [INSTR] * 8, max_new_tokens=2,
                                             stop=["A"])


def test_episodes_in_flight_follow_the_free_memory(model, monkeypatch):
    """max_slots None: every episode in one wave where the keys/values fit half the free
    memory; with room for 2 slots, waves of 2 (and the same tokens)."""
    prompts = _prompts(LENGTHS)
    eos = _eos(model, prompts)
    ref = _reference(model, prompts, eos, 4)
    engine = SlotEngine(model, eos, PAD)
    assert engine._slots(prompts, [INSTR] * 8, 2, 4) == 8
    assert engine.episodes(prompts, [INSTR] * 8, max_new_tokens=4, greedy=True)[:2] == ref
    # one slot: 2 layers x K and V x 2 kv heads x head_dim 8 x capacity 12 + 3 + 2 x 4 + 1
    # = 24 columns, fp64
    per_slot = 2 * 2 * 2 * 8 * 24 * 8
    import score_fast.slot_engine as se
    fresh = SlotEngine(model, eos, PAD)
    monkeypatch.setattr(se.os, "sysconf", lambda name: 1 if name == "SC_PAGE_SIZE"
                        else 5 * per_slot)  # half of it: 2.5 slots
    assert fresh._slots(prompts, [INSTR] * 8, 2, 4) == 2
    assert fresh.episodes(prompts, [INSTR] * 8, max_new_tokens=4, greedy=True)[:2] == ref
    assert fresh.pool.length.shape[0] == 2


def test_gumbel_noise_is_gumbel():
    g = gumbel_noise(torch.tensor([7]), torch.arange(400), torch.zeros(400, dtype=torch.long),
                     torch.zeros(400, dtype=torch.long), 500).view(-1)
    # Gumbel(0, 1): mean = Euler's gamma, variance pi^2 / 6; 200k draws
    assert abs(g.mean().item() - 0.5772) < 0.01 and abs(g.var().item() - 1.6449) < 0.03
    u = torch.exp(-torch.exp(-g))  # back to the uniforms: 10 equal bins
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert ((counts - 20000).abs() < 600).all(), counts


class _Syncs(TorchDispatchMode):
    """Counts the ops that read a device value on the host (a sync on a GPU)."""
    NAMES = ("_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(n in str(func) for n in self.NAMES):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _ready(model, n=8, attempts=2):
    """An engine with a wave set up (prefilled), and its bucket's step."""
    prompts = _prompts(LENGTHS[:n])
    engine = SlotEngine(model, 5, PAD)
    engine.episodes(prompts, [INSTR] * n, max_new_tokens=1, greedy=True)  # allocates
    _restart(engine, n)
    return engine, engine._runner(n, engine.pool.keys[0].shape[2], True, 1.0, attempts, 1)


def _restart(engine, n):
    """The wave's episodes back to the start of attempt 1 (their prompts stay prefilled)."""
    p = engine.pool
    p.phase[:n], p.forced[:n] = 0, 0
    p.count.zero_()


def test_a_step_has_no_host_sync_and_keeps_its_buffers(model):
    engine, step = _ready(model)
    p = engine.pool
    ptrs = [t.data_ptr() for t in (*p.keys, *p.values, p.length, p.inp, p.phase, p.forced,
                                   p.episode, p.out, p.count, p.ended_eos, p.instr)]
    with _Syncs() as syncs:
        for _ in range(6):
            step()
    assert syncs.count == 0
    assert ptrs == [t.data_ptr() for t in (*p.keys, *p.values, p.length, p.inp, p.phase,
                                           p.forced, p.episode, p.out, p.count, p.ended_eos,
                                           p.instr)]
    assert (p.phase[:8] == DONE).all()  # 1 token, the instruction, 1 token: done


def test_the_step_compiles_to_one_graph(model):
    import torch._dynamo
    engine, _ = _ready(model)
    view = engine.pool.view(8)

    def step():
        engine._step(view, 16, False, 0.8, 2, 1)

    torch._dynamo.reset()
    explain = torch._dynamo.explain(step)()  # it runs the step
    _restart(engine, 8)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    # fullgraph with scalar outputs disallowed: a stray .item() / .tolist() would raise
    with torch._dynamo.config.patch(capture_scalar_outputs=False,
                                    capture_dynamic_output_shape_ops=False):
        torch.compile(step, fullgraph=True, backend="aot_eager")()
        assert (engine.pool.count[:8, 0] == 1).all()  # it ran: a token each


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_equal_the_sampler_and_sample_like_the_cpu(model):
    """On a GPU every bucket's step is a captured CUDA graph (the host reads the phases one
    check behind); greedy tokens equal the sampler's there, and the sampled tokens of an
    episode are the CPU's (the noise is a function of seed and episode, not of the device)."""
    cuda = _model().cuda()
    prompts = _prompts(LENGTHS)
    eos = _eos(model, prompts)
    engine = SlotEngine(cuda, eos, PAD, check_every=2)
    assert engine.graphs
    b1, b2, _ = engine.episodes(prompts, [INSTR] * 8, max_new_tokens=8, greedy=True)
    sampler = TwoTurnSampler(cuda, eos, PAD, batch_size=8)
    s1, s2, _ = sampler.episodes(prompts, [INSTR] * 8, max_new_tokens=8, greedy=True)
    assert (b1, b2) == (s1, s2) == _reference(model, prompts, eos, 8)
    cpu = SlotEngine(model, eos, PAD).episodes(prompts, [INSTR] * 8, max_new_tokens=8,
                                               temperature=1.0, seed=5)
    gpu = engine.episodes(prompts, [INSTR] * 8, max_new_tokens=8, temperature=1.0, seed=5)
    assert gpu[:2] == cpu[:2]
