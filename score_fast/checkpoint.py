"""Checkpoints: run_dir/checkpoint-N/ holds the policy (HF safetensors, loadable by
AutoModelForCausalLM.from_pretrained), the tokenizer, the resolved config.yaml, and
trainer_state.pt (optimizer, step, RNG states of torch / python / numpy).

Written by several ranks (FSDP2, score_fast.distributed): the full model is gathered and
rank 0 writes it (still one from_pretrained-loadable model); the AdamW state stays sharded,
written by every rank through torch.distributed.checkpoint into optimizer/ (DCP reshards on
load, so any number of ranks, one included, can resume it); each rank's RNG state goes to
rng-<rank>.pt.

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

__all__ = ["save_checkpoint", "latest_checkpoint", "rotate_checkpoints", "load_state",
           "rng_state", "set_rng_state"]

OPTIM_DIR = "optimizer"

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
                    config_yaml: str | None = None, dist=None) -> str:
    """Write checkpoint-`step` atomically; returns its path. `state` is extra trainer state
    (step, stage, ...); the RNG states are added here. dist: a score_fast.distributed.Dist
    (every rank calls this together) or None for one process."""
    from score_fast import distributed
    main = dist is None or dist.main
    final = os.path.join(run_dir, f"checkpoint-{step}")
    tmp = os.path.join(run_dir, f".tmp-checkpoint-{step}")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    sharded = dist is not None and dist.enabled
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict,
                                                             get_optimizer_state_dict)
        distributed.barrier(dist)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=os.path.join(tmp, OPTIM_DIR))
        torch.save(rng_state(), os.path.join(tmp, f"rng-{dist.rank}.pt"))
    if main:
        if sharded:
            model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
            extra = {"optimizer_dcp": OPTIM_DIR, "world_size": dist.world}
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            extra = {"optimizer": optimizer.state_dict()}
        tokenizer.save_pretrained(tmp)
        if config_yaml is not None:
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                f.write(config_yaml)
    if sharded:
        distributed.barrier(dist)  # every rank's shards are on disk before the rename
    if main:
        # trainer_state.pt last: latest_checkpoint only takes directories that have it
        torch.save({**state, "step": step, **extra, "rng": rng_state()},
                   os.path.join(tmp, STATE_FILE))
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): drop the old one
            old = os.path.join(run_dir, f".old-checkpoint-{step}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    if sharded:
        distributed.barrier(dist)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The complete checkpoint with the highest step, or None."""
    if not os.path.isdir(run_dir):
        return None
    found = _complete(run_dir)
    return os.path.join(run_dir, found[-1][1]) if found else None


def _complete(run_dir: str) -> list[tuple[int, str]]:
    """(step, name) of the complete checkpoints (trainer_state.pt written), by step."""
    return sorted((int(m.group(1)), name) for name in os.listdir(run_dir)
                  if (m := _NAME.match(name)) and os.path.isfile(os.path.join(run_dir, name,
                                                                              STATE_FILE)))


def rotate_checkpoints(run_dir: str, keep_last: int) -> list[str]:
    """Remove all but the newest `keep_last` (>= 1) complete checkpoints; returns the paths
    removed. The newest complete checkpoint is never among them, so a crash during a later
    save can always resume; directories being written (.tmp-) and incomplete ones are not
    touched."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    gone = [os.path.join(run_dir, name) for _, name in _complete(run_dir)[:-keep_last]]
    for path in gone:
        shutil.rmtree(path)
    return gone


def load_state(path: str, model=None, optimizer=None, dist=None) -> dict:
    """trainer_state.pt of a checkpoint (step, rng, ...). With `optimizer` (and `model`,
    the policy it optimizes) also loads the optimizer state into it: from the file when one
    process wrote it, through DCP (any number of ranks) when several did. The returned
    "rng" is this rank's own state when the checkpoint has one."""
    # weights_only=False: the state holds python's RNG tuple and numpy arrays (our own file)
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
    sharded = dist is not None and dist.enabled
    if optimizer is not None:
        if "optimizer_dcp" in state:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                                 set_optimizer_state_dict)
            target = {"optimizer": get_optimizer_state_dict(model, optimizer)}
            dcp.load(target, checkpoint_id=os.path.join(path, state["optimizer_dcp"]))
            set_optimizer_state_dict(model, optimizer, target["optimizer"])
        elif sharded:
            raise ValueError(f"{path} was written by one process (its optimizer state is one "
                             f"file); resume it with one process, not {dist.world} ranks")
        else:
            optimizer.load_state_dict(state["optimizer"])
    rank_file = os.path.join(path, f"rng-{dist.rank if dist is not None else 0}.pt")
    if os.path.isfile(rank_file):
        state["rng"] = torch.load(rank_file, map_location="cpu", weights_only=False)
    return state
