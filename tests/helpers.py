"""Helpers the tests share (and tests/dist_step.py imports under torchrun): a tiny run's
files and config, three fixed episodes, the SCoRe objective written out by hand for them,
a torchrun launcher, and a chi-square goodness-of-fit p-value for sampled tokens."""
import dataclasses
import json
import os
import subprocess
import sys

import torch
import transformers
import yaml

from score_fast.config import (Config, DataConfig, ModelConfig, RewardConfig, RolloutConfig,
                               Stage1Config, Stage2Config, TrainConfig)
from score_fast.demo import task as demo_task
from score_fast.rollout import Episode, Formatter

__all__ = ["make_run", "fixed_episodes", "R1", "R2", "B1", "B2", "VARIANTS", "hand_loss",
           "torchrun", "write_config", "chi_square_p"]


def make_run(tmp_path, n_rows=12, **train):
    """A tiny random Llama + char tokenizer saved to tmp_path/model, a JSONL of arithmetic
    problems, and a Config for them (2 Stage I + 2 Stage II steps)."""
    model_dir = tmp_path / "model"
    if not model_dir.exists():
        tok = demo_task.build_tokenizer()
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_task.make_problems(n_rows, seed=1)))
    # a random model never writes the right sum: reward even-length answers instead, so
    # that the advantages (and so the updates) are not all zero
    parity = tmp_path / "parity.py"
    parity.write_text("def parity(completions, **_):\n"
                      "    return [float(len(c) % 2 == 0) for c in completions]\n")
    t = dict(run_dir=str(tmp_path / "run"), prompts_per_step=3, lr=1e-2, save_every=2)
    t.update(train)
    return Config(model=ModelConfig(path=str(model_dir)), data=DataConfig(train_file=str(data)),
                  rollout=RolloutConfig(samples_per_prompt=2, max_new_tokens=4,
                                        instruction=demo_task.DEMO_INSTRUCTION),
                  reward=RewardConfig(kind="custom", function=f"{parity}:parity"),
                  stage1=Stage1Config(steps=2), stage2=Stage2Config(steps=2),
                  train=TrainConfig(**t))


def fixed_episodes(tok):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    fmt = Formatter(tok, demo_task.DEMO_INSTRUCTION)
    out = []
    for i, (p, a1, a2) in enumerate([("12+30", "42", "41"), ("7-9", "-2", "-23"),
                                     ("5+5", "10", "10")]):
        y1 = enc(a1) + [eos]
        out.append(Episode(i % 2, fmt.prompt_ids(p), y1, fmt.instruction_ids(p, y1),
                           enc(a2) + [eos]))
    return out


# Rewards of the three episodes of fixed_episodes (groups 0, 1, 0) and, worked out by hand, what
# each variant trains: {(episode, attempt): (advantage or None for no policy gradient,
# KL weight)}; attempts missing from a variant's table are not trained at all. Group 1 has
# one episode, so its RLOO advantage is 0. Group 0 is episodes 0 and 2:
#   r1 = (1, 0): attempt-1 advantages (+1, -1)
#   Stage I reward on attempt 2 is r2 = (0, 1): (-1, +1)
#   Stage II attempt-2 reward r2 + 10 (r2 - r1) = (-10, 11): (-21, +21); alpha 0: (-1, +1)
R1, R2 = [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]
B1, B2 = 0.01, 0.1
VARIANTS = {
    "stage1": ({}, 1, {(0, 1): (None, B2), (1, 1): (None, B2), (2, 1): (None, B2),
                       (0, 2): (-1, B1), (1, 2): (0, B1), (2, 2): (1, B1)}),
    "stage2": ({}, 2, {(0, 1): (1, B1), (1, 1): (0, B1), (2, 1): (-1, B1),
                       (0, 2): (-21, B1), (1, 2): (0, B1), (2, 2): (21, B1)}),
    "stage2_alpha0": ({"alpha": 0.0}, 2, {(0, 1): (1, B1), (1, 1): (0, B1), (2, 1): (-1, B1),
                                          (0, 2): (-1, B1), (1, 2): (0, B1), (2, 2): (1, B1)}),
    "single_turn": ({"single_turn": True}, 1, {(0, 1): (1, B1), (1, 1): (0, B1),
                                               (2, 1): (-1, B1)}),
    # STaR in Stage II: SFT (advantage 1, no KL) on attempt 2 of the wrong -> right episodes
    "star": ({"method": "star"}, 2, {(1, 2): (1, 0.0), (2, 2): (1, 0.0)}),
}


def hand_loss(policy, ref, episodes, table, kl="k2", temperature=1.0):
    """The objective written out token by token from full logits (token_mean; the k2 KL,
    the default, or k3 for train.kl=k3_reverse; log-probs of softmax(logits / T))."""
    terms = []
    for e_idx, ep in enumerate(episodes):
        ids = torch.tensor([ep.ids])
        tgt, lab = ids[0, 1:], torch.tensor(ep.labels[1:])
        logits = policy(input_ids=ids).logits[0, :-1].double() / temperature
        logp = torch.log_softmax(logits, -1).gather(1, tgt[:, None])[:, 0]
        with torch.no_grad():
            rl = torch.log_softmax(ref(input_ids=ids).logits[0, :-1].double() / temperature,
                                   -1)
            rl = rl.gather(1, tgt[:, None])[:, 0]
        for t in range(len(tgt)):
            if (e_idx, int(lab[t])) not in table:
                continue
            adv, beta = table[e_idx, int(lab[t])]
            d = rl[t] - logp[t]
            k = 0.5 * d * d if kl == "k2" else torch.exp(d) - d - 1
            terms.append((0.0 if adv is None else -adv * logp[t]) + beta * k)
    return torch.stack(terms).mean()


def torchrun(args, n=2, timeout=300):
    """Run a script under torchrun on n CPU ranks (n = 1: plain python), the kernels
    interpreted, as a user launches it; its output if it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--standalone", *args] if n > 1 else [sys.executable, *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def write_config(config, path):
    """config as the YAML file `score-fast train --config` reads; its path."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    return str(path)


def chi_square_p(tokens, probs):
    """p-value of the goodness-of-fit of the sampled tokens to `probs` [V]: bins of an
    expected count < 5 pooled into one (the test's validity condition); a token drawn
    where the probability is 0 gives p = 0."""
    n = tokens.numel()
    counts = torch.bincount(tokens.view(-1), minlength=probs.numel()).double()
    if bool((counts[probs == 0] > 0).any()):
        return 0.0
    exp = probs.double() * n
    big = exp >= 5
    obs_b, exp_b = counts[big], exp[big]
    if bool((~big).any()) and exp[~big].sum() > 0:
        obs_b = torch.cat([obs_b, counts[~big].sum()[None]])
        exp_b = torch.cat([exp_b, exp[~big].sum()[None]])
    stat = ((obs_b - exp_b) ** 2 / exp_b).sum()
    df = obs_b.numel() - 1
    return torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                   stat / 2).item()
