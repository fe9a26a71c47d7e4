"""Episode layout: [prompt | attempt 1 | instruction | attempt 2] as tokens and labels."""
import pytest
import torch
import transformers

from score_fast import demo_task
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
