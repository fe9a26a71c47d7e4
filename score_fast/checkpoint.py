"""Checkpoints: run_dir/checkpoint-N/ holds the policy (HF safetensors, loadable by
AutoModelForCausalLM.from_pretrained), the tokenizer, the resolved config.yaml, and
trainer_state.pt (optimizer, step, RNG states of torch / python / numpy).

Atomic: everything is written into run_dir/.tmp-checkpoint-N, then os.replace renames the
directory into place; a crash mid-write leaves only a .tmp- directory, which
latest_checkpoint ignores (and the next save of that step removes)."""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "load_state", "rng_state", "set_rng_state"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, step: int, model, tokenizer, optimizer, state: dict,
                    config_yaml: str | None = None) -> str:
    """Write checkpoint-`step` atomically; returns its path. `state` is extra trainer state
    (step, stage, ...); the RNG states are added here."""
    final = os.path.join(run_dir, f"checkpoint-{step}")
    tmp = os.path.join(run_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if config_yaml is not None:
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
    torch.save({**state, "step": step, "optimizer": optimizer.state_dict(),
                "rng": rng_state()}, os.path.join(tmp, STATE_FILE))
    if os.path.exists(final):  # re-saving a step (e.g. after a resume): drop the old one
        old = os.path.join(run_dir, f".old-checkpoint-{step}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The complete checkpoint with the highest step, or None."""
    if not os.path.isdir(run_dir):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir)
             if (m := _NAME.match(name)) and os.path.isfile(os.path.join(run_dir, name,
                                                                         STATE_FILE))]
    return os.path.join(run_dir, max(found)[1]) if found else None


def load_state(path: str) -> dict:
    """trainer_state.pt of a checkpoint (optimizer state, step, rng, ...)."""
    # weights_only=False: the state holds python's RNG tuple and numpy arrays (our own file)
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
