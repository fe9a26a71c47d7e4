"""Episode layout: [prompt | attempt 1 | instruction | attempt 2] as tokens and labels."""
import pytest
import torch
import transformers

from score_fast.demo import task as demo_task
from score_fast.rollout import Formatter, _strip, rollout


@pytest.fixture(scope="module")
def tok():
    return demo_task.build_tokenizer()


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_layout_exact(tok):
    fmt = Formatter(tok, "Fix:")
    eos, bos = tok.eos_token_id, tok.bos_token_id
    prompt = fmt.prompt_ids("3+4")
    assert prompt == [bos] + enc(tok, "U:3+4\nA:")
    a1 = enc(tok, "8") + [eos]
    instr = fmt.instruction_ids("3+4", a1)
    # attempt 1 ended with the template's end-of-turn (eos): not repeated
    assert instr == enc(tok, "U:Fix:\nA:")
    # attempt 1 cut at max_new_tokens (no eos): the template's eos closes the turn
    assert fmt.instruction_ids("3+4", enc(tok, "8")) == [eos] + enc(tok, "U:Fix:\nA:")
    # the full sequence is exactly what the chat template renders for the conversation
    from score_fast.rollout import Episode
    a2 = enc(tok, "7") + [eos]
    ep = Episode(0, prompt, a1, instr, a2)
    full = tok.apply_chat_template(
        [{"role": "user", "content": "3+4"}, {"role": "assistant", "content": "8"},
         {"role": "user", "content": "Fix:"}, {"role": "assistant", "content": "7"}],
        tokenize=False)
    assert ep.ids == enc(tok, full)
    assert ep.labels == [0] * 9 + [1, 1] + [0] * 9 + [2, 2]  # <bos>U:3+4\nA: | 8<eos> | U:Fix:\nA: | 7<eos>


def test_plain_layout_without_template(tok):
    tok = demo_task.build_tokenizer()
    tok.chat_template = None
    fmt = Formatter(tok, "Fix:")
    assert not fmt.chat
    assert fmt.prompt_ids("3+4") == enc(tok, "3+4\n\n")  # this tokenizer adds no bos
    assert fmt.instruction_ids("3+4", [5]) == enc(tok, "\n\nFix:\n\n")


def test_strip_cuts_after_first_eos():
    assert _strip([5, 6, 2, 7, 0], eos=2, pad=0) == [5, 6, 2]
    assert _strip([5, 6, 0, 0], eos=2, pad=0) == [5, 6]
    assert _strip([5, 6, 7], eos=2, pad=0) == [5, 6, 7]


def test_rollout_episodes_are_consistent(tok):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok))
    fmt = Formatter(tok, "Fix:")
    eps, timing = rollout(model, tok, fmt, ["1+2", "33-4"], samples=3, max_new_tokens=5,
                          batch_size=4)
    assert [e.prompt_index for e in eps] == [0, 0, 0, 1, 1, 1]
    assert timing["gen_tokens"] == sum(len(e.attempt1_ids) + len(e.attempt2_ids) for e in eps)
    for e in eps:
        assert e.prompt_ids == fmt.prompt_ids(["1+2", "33-4"][e.prompt_index])
        assert 1 <= len(e.attempt1_ids) <= 5 and 1 <= len(e.attempt2_ids) <= 5
        assert e.instruction_ids == fmt.instruction_ids("", e.attempt1_ids)
        n = len(e.prompt_ids)
        lab = e.labels
        assert len(lab) == len(e.ids)
        assert lab[n:n + len(e.attempt1_ids)] == [1] * len(e.attempt1_ids)
        assert lab[-len(e.attempt2_ids):] == [2] * len(e.attempt2_ids)
        assert lab.count(1) == len(e.attempt1_ids) and lab.count(2) == len(e.attempt2_ids)
        assert e.text1 == tok.decode(e.attempt1_ids, skip_special_tokens=True)
        # at most one eos per attempt, and only at its end
        for a in (e.attempt1_ids, e.attempt2_ids):
            assert tok.eos_token_id not in a[:-1]


def test_greedy_rollout_is_deterministic(tok):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok))
    fmt = Formatter(tok, "Fix:")
    a, _ = rollout(model, tok, fmt, ["1+2", "5-7"], samples=1, max_new_tokens=4, greedy=True)
    b, _ = rollout(model, tok, fmt, ["1+2", "5-7"], samples=1, max_new_tokens=4, greedy=True,
                   batch_size=1)  # no left padding: batched == unbatched
    assert [e.ids for e in a] == [e.ids for e in b]


def test_prompt_longer_than_limit_names_row(tok):
    fmt = Formatter(tok, "Fix:")
    with pytest.raises(ValueError, match=r"row 2 of f.jsonl: the prompt is \d+ tokens"):
        rollout(None, tok, fmt, ["1+2", "9" * 50], samples=1, max_new_tokens=2,
                max_prompt_tokens=20, row_names=["row 1 of f.jsonl", "row 2 of f.jsonl"])


def test_single_turn_rollout_samples_attempt1_only(tok, monkeypatch):
    """attempts=1 (train.single_turn): [prompt | attempt 1] episodes, labels 0 / 1; no
    instruction is built and the sampler runs no attempt-2 forward; greedy attempt 1 is the
    two-attempt rollout's attempt 1."""
    from score_fast.sampler import TwoTurnSampler
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok))
    fmt = Formatter(tok, "Fix:")
    problems = ["1+2", "33-4", "5-7"]
    two, _ = rollout(model, tok, fmt, problems, samples=1, max_new_tokens=5, greedy=True)
    stats = []
    real_init = TwoTurnSampler.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        stats.append(self.stats)

    def never(*a, **k):
        raise AssertionError("attempts=1 asked for attempt 2")
    monkeypatch.setattr(TwoTurnSampler, "__init__", init)
    monkeypatch.setattr(TwoTurnSampler, "attempt2", never)
    monkeypatch.setattr(Formatter, "instruction_ids", never)
    one, timing = rollout(model, tok, fmt, problems, samples=1, max_new_tokens=5, greedy=True,
                          attempts=1)
    assert [e.attempt1_ids for e in one] == [e.attempt1_ids for e in two]
    assert [e.text1 for e in one] == [e.text1 for e in two]
    for e in one:
        assert e.instruction_ids == e.attempt2_ids == [] and e.text2 == ""
        assert e.ids == e.prompt_ids + e.attempt1_ids
        assert e.labels == [0] * len(e.prompt_ids) + [1] * len(e.attempt1_ids)
    n1 = sum(len(e.attempt1_ids) for e in one)
    assert timing["attempt2_seconds"] == 0 and timing["gen_tokens"] == n1
    assert timing["prefill_tokens"] <= sum(len(e.prompt_ids) for e in one)
    assert timing["decode_tokens"] <= n1
    (st,) = stats
    assert st.summary("attempt2")["forwards"] == 0 and st.summary()["forwards"] > 0
    # sampling (temperature 1): still attempt 1 only, samples per problem as asked
    eps, _ = rollout(model, tok, fmt, problems, samples=2, max_new_tokens=5, attempts=1)
    assert [e.prompt_index for e in eps] == [0, 0, 1, 1, 2, 2]
    assert all(1 <= len(e.attempt1_ids) <= 5 and not e.attempt2_ids for e in eps)
    with pytest.raises(ValueError, match="attempts=3"):
        rollout(model, tok, fmt, problems, samples=1, max_new_tokens=5, attempts=3)


class _Engine:
    """VLLMEngine's rollout protocol (its own `episodes`) over a generate that answers from
    the HF sampler: records each generate call's contexts."""
    from score_fast.vllm_engine import VLLMEngine
    episodes = VLLMEngine.episodes

    def __init__(self, model, pad):
        from score_fast.sampler import TwoTurnSampler
        self.sampler, self.calls = TwoTurnSampler(model, None, pad), []
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}

    def generate(self, contexts, *, eos, max_new_tokens, temperature, greedy):
        self.calls.append(contexts)
        self.sampler.eos = {eos}
        out = self.sampler.sample(contexts, max_new_tokens=max_new_tokens, greedy=greedy,
                                  temperature=temperature)
        self.stats["prompt_tokens"] += sum(len(c) for c in contexts)
        self.stats["generated_tokens"] += sum(len(o) for o in out)
        return out


def test_single_turn_rollout_with_an_engine_requests_attempt1_only(tok):
    """The rollout.backend=vllm path (an engine stand-in; tests/test_vllm.py runs the real
    one where vLLM is installed): attempts=1 makes one generate call, of the prompts."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok))
    fmt = Formatter(tok, "Fix:")
    problems = ["1+2", "33-4"]
    engine = _Engine(model, tok.pad_token_id)
    two, _ = rollout(None, tok, fmt, problems, samples=1, max_new_tokens=4, greedy=True,
                     engine=engine)
    assert len(engine.calls) == 2
    engine.calls.clear()
    one, timing = rollout(None, tok, fmt, problems, samples=1, max_new_tokens=4, greedy=True,
                          engine=engine, attempts=1)
    assert engine.calls == [[e.prompt_ids for e in one]]
    assert [e.ids for e in one] == [e.prompt_ids + e.attempt1_ids for e in two]
    assert all(e.attempt2_ids == [] and e.instruction_ids == [] for e in one)
    n1 = sum(len(e.attempt1_ids) for e in one)
    assert timing["attempt2_seconds"] == 0 and timing["decode_tokens"] == n1
    assert timing["prefill_tokens"] == sum(len(e.prompt_ids) for e in one)
