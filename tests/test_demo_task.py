"""score_fast.demo.task: problem generation, the exact-match reward, the character tokenizer
and its chat template, and the tiny Llama config."""
import pytest
import torch
import transformers

from score_fast.demo.task import (DEMO_INSTRUCTION, build_tokenizer, exact_reward,
                                  make_problems, tiny_model_config)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# ---- make_problems --------------------------------------------------------------------------

def test_problems_are_deterministic_and_seed_dependent():
    a = make_problems(50, seed=1)
    assert a == make_problems(50, seed=1)
    assert a != make_problems(50, seed=2)
    assert make_problems(10, seed=1) == a[:10]  # a longer run extends a shorter one


@pytest.mark.parametrize("digits,ops", [(1, "+"), (2, "+-"), (3, "+-*"), (5, "*")])
def test_problems_are_well_formed_and_answers_right(digits, ops):
    rows = make_problems(300, seed=0, digits=digits, ops=ops)
    assert len(rows) == 300
    seen_ops = set()
    for row in rows:
        assert set(row) == {"problem", "answer"}
        op = next(c for c in row["problem"] if c in "+-*")
        seen_ops.add(op)
        a, b = row["problem"].split(op)
        assert len(a) == len(b) == digits and a.isdigit() and b.isdigit()
        assert digits == 1 or (a[0] != "0" and b[0] != "0")
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["answer"] == str(expected)
    assert seen_ops == set(ops)


def test_subtraction_can_be_negative():
    answers = [r["answer"] for r in make_problems(200, seed=0, ops="-")]
    assert any(a.startswith("-") for a in answers) and any(a.isdigit() for a in answers)


def test_zero_problems():
    assert make_problems(0, seed=0) == []


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(n=-1, seed=0), ValueError, "n must be"),
    (dict(n=2.0, seed=0), ValueError, "n must be"),
    (dict(n=2, seed="a"), TypeError, "seed must be an int"),
    (dict(n=2, seed=0, digits=0), ValueError, "digits"),
    (dict(n=2, seed=0, ops=""), ValueError, "ops"),
    (dict(n=2, seed=0, ops="+/"), ValueError, "ops"),
])
def test_problem_args_checked(kwargs, err, match):
    with pytest.raises(err, match=match):
        make_problems(**kwargs)


# ---- exact_reward ---------------------------------------------------------------------------

def test_exact_reward_hand_cases():
    completions = ["37+58=95", "95 ", "96", "", "95\n", "= 95", "x=1=95", "95=", "095",
                   "95.0", "-46", "46"]
    answers = ["95"] * 10 + ["-46", "-46"]
    assert exact_reward(completions, answer=answers) == \
        [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_exact_reward_ignores_other_fields_and_checks_lengths():
    assert exact_reward(["1"], answer=["1"], problem=["0+1"], level=[3]) == [1.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        exact_reward(["1", "2"], answer=["1"])
    with pytest.raises(TypeError, match="lists"):
        exact_reward(["1"], answer="1")
    with pytest.raises(TypeError, match=r"completions\[0\] is NoneType"):
        exact_reward([None], answer=["1"])


def test_exact_reward_loads_as_custom_reward():
    from score_fast.rewards import CustomReward, CustomRewardConfig
    reward = CustomReward(CustomRewardConfig(function="score_fast.demo.task:exact_reward"))
    rows = make_problems(2, seed=0)
    good = [rows[0]["problem"] + "=" + rows[0]["answer"], "nope"]
    assert reward.score(good, rows) == [1.0, 0.0]


# ---- tokenizer ------------------------------------------------------------------------------

def test_tokenizer_vocab_and_special_ids(tokenizer):
    assert len(tokenizer) < 128
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token_id == 3


def test_tokenizer_round_trip(tokenizer):
    texts = [r["problem"] + "=" + r["answer"] for r in make_problems(20, seed=3, ops="+-*")]
    texts += [DEMO_INSTRUCTION, "  a  b\n\nc ", "U:37+58\nA:95", "", "~!@#$%^&*()_{}|:\"<>?"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert len(ids) == len(text)  # one token per character, no specials added
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode("é")) == "<unk>"


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "37+58"}, {"role": "assistant", "content": "95"},
                {"role": "user", "content": DEMO_INSTRUCTION}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos>U:37+58\nA:95<eos>U:Check and fix:\nA:"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids) == text
    # Prefix property: the turn-1 prompt's ids start the two-turn conversation's ids.
    first = tokenizer.apply_chat_template(messages[:1], tokenize=True,
                                          add_generation_prompt=True, return_dict=False)
    assert ids[:len(first)] == first
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False) == "<bos>U:37+58\n"


def test_chat_template_rejects_unknown_role(tokenizer):
    jinja2 = pytest.importorskip("jinja2")
    with pytest.raises(jinja2.TemplateError, match="unknown role system"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_tokenizer_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "12-58"}]
    for tok in (tokenizer, loaded):
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
            == "<bos>U:12-58\nA:"
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")
    text = "37+58=95\nCheck and fix:"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    batch = loaded(["1+1", "12+34"], padding=True)
    assert batch["input_ids"][0][-2:] == [loaded.pad_token_id] * 2


# ---- tiny model -----------------------------------------------------------------------------

def test_tiny_model_config(tokenizer):
    cfg = tiny_model_config(tokenizer)
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert cfg.tie_word_embeddings is False
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)


def test_tiny_model_forward_backward(tokenizer):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_model_config(tokenizer))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "37+58"},
                                         {"role": "assistant", "content": "95"}],
                                        return_dict=False)
    ids = torch.tensor([ids] * 4)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (4, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,match", [(dict(hidden=65), "divisible"),
                                          (dict(layers=0), "layers"),
                                          (dict(heads=True), "heads")])
def test_tiny_model_config_checks_args(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model_config(tokenizer, **kwargs)
