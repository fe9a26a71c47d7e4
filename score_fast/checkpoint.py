"""Checkpoints: run_dir/checkpoint-N/ holds the policy (HF safetensors, loadable by
AutoModelForCausalLM.from_pretrained), the tokenizer, the resolved config.yaml, and
trainer_state.pt (optimizer, step, RNG states of torch / python / numpy).

The weights are written in the model's own dtype (model.dtype: a bf16 model's checkpoint is
bf16, half an fp32 one). A LoRA policy writes its adapters (adapter_model.safetensors +
adapter_config.json, fp32, a few MB) and, with model.lora.save_merged, merged/: base +
adapters as one from_pretrained-loadable model.

Written from an FSDP2 policy (several ranks, or one rank with fp32 master weights under bf16
or an offloaded optimizer: score_fast.models): the full model is gathered and rank 0 writes
it (still one from_pretrained-loadable model); the AdamW state, and the fp32 master weights
where the safetensors are in a lower dtype, stay sharded, written by every rank through
torch.distributed.checkpoint into optimizer/ (DCP reshards on load, so any number of ranks,
one included, can resume it); each rank's RNG state goes to rng-<rank>.pt.

Atomic: everything is written into run_dir/.tmp-checkpoint-N, then os.replace renames the
directory into place; a crash mid-write leaves only a .tmp- directory, which
latest_checkpoint ignores and recover_interrupted (at the next start) removes.

Verified: manifest.json, written last, holds every file's size and SHA-256 (hashed in
threads: ~1.5 GB/s a core on the CI machine's SHA extensions). usable_checkpoint checks
them before a resume: a truncated, overwritten or emptied file is named, and the run falls
back to the newest checkpoint that verifies."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "rotate_checkpoints", "load_state",
           "rng_state", "set_rng_state", "CheckpointError", "write_manifest", "verify_checkpoint",
           "usable_checkpoint", "recover_interrupted"]

log = logging.getLogger("score_fast")

OPTIM_DIR = "optimizer"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


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
                    config_yaml: str | None = None, dist=None, merged: bool = False) -> str:
    """Write checkpoint-`step` atomically; returns its path. `state` is extra trainer state
    (step, stage, ...); the RNG states are added here. dist: a score_fast.distributed.Dist
    (every rank calls this together) or None for one process. merged: a LoRA policy also
    writes merged/ (base + adapters)."""
    from score_fast import distributed
    from score_fast.models import compute_dtype, is_lora, lora_base, merged_state_dict
    main = dist is None or dist.main
    final = os.path.join(run_dir, f"checkpoint-{step}")
    tmp = os.path.join(run_dir, f".tmp-checkpoint-{step}")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dtype, lora = compute_dtype(model), is_lora(model)
    sharded = distributed.is_sharded(model)
    # fp32 master weights under a lower-precision file: kept beside it for an exact resume
    master = sharded and not lora and dtype != torch.float32
    full = None
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict,
                                                             get_optimizer_state_dict)
        distributed.barrier(dist)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
        shards = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        if master:
            shards["model"] = get_model_state_dict(model)
        dcp.save(shards, checkpoint_id=os.path.join(tmp, OPTIM_DIR))
        torch.save(rng_state(), os.path.join(tmp, f"rng-{dist.rank}.pt"))
    if main:
        if lora:
            if merged:
                sd = full if full is not None else model.state_dict()
                cfg = model.peft_config["default"]
                lora_base(model).save_pretrained(
                    os.path.join(tmp, "merged"), safe_serialization=True,
                    state_dict=merged_state_dict(sd, cfg.lora_alpha / cfg.r, dtype))
                tokenizer.save_pretrained(os.path.join(tmp, "merged"))
            model.save_pretrained(tmp, safe_serialization=True,
                                  **({"state_dict": full} if full is not None else {}))
        elif full is not None:  # FSDP2: the gathered masters, written in the model's dtype
            model.save_pretrained(tmp, safe_serialization=True, state_dict={
                k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()})
            _record_dtype(os.path.join(tmp, "config.json"), dtype)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if sharded:
            extra = {"optimizer_dcp": OPTIM_DIR, "world_size": dist.world, "master": master}
        else:
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
        write_manifest(tmp)  # every file's size and checksum, rank shards included
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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):  # hashlib drops the GIL on large buffers
            h.update(chunk)
    return h.hexdigest()


def _files(path: str) -> list[str]:
    out = []
    for root, _, names in os.walk(path):
        out += [os.path.relpath(os.path.join(root, n), path) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def write_manifest(path: str) -> dict:
    """path/manifest.json: {"files": {relative path: {"size", "sha256"}}} of every file
    under path."""
    names = _files(path)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        sums = list(pool.map(lambda n: _sha256(os.path.join(path, n)), names))
    manifest = {"files": {n: {"size": os.path.getsize(os.path.join(path, n)), "sha256": h}
                          for n, h in zip(names, sums)}}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def verify_checkpoint(path: str) -> str | None:
    """None when every file in path's manifest is there with its size and checksum; else
    what is wrong, naming the file. A checkpoint without a manifest (written before there
    were any) is not verified: None, and a warning."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        log.warning("%s has no %s (an older checkpoint): resumed unverified", path, MANIFEST)
        return None
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, want in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        size = os.path.getsize(full)
        if size != want["size"]:
            return f"{name} is {size} bytes, the manifest says {want['size']}"
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        sums = dict(zip(files, pool.map(lambda n: _sha256(os.path.join(path, n)), files)))
    for name, want in files.items():
        if sums[name] != want["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (overwritten?)"
    return None


def usable_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint that verifies (verify_checkpoint), or None when there
    is no complete one. A damaged one is named in a warning and the previous is tried; when
    every one is damaged, CheckpointError names them all."""
    if not os.path.isdir(run_dir):
        return None
    damaged = []
    for _, name in reversed(_complete(run_dir)):
        path = os.path.join(run_dir, name)
        why = verify_checkpoint(path)
        if why is None:
            if damaged:
                log.warning("resuming from %s instead", path)
            return path
        log.error("checkpoint %s is damaged: %s", path, why)
        damaged.append(f"{name}: {why}")
    if damaged:
        raise CheckpointError(f"every checkpoint in {run_dir} is damaged, nothing to resume: "
                              + "; ".join(damaged))
    return None


def recover_interrupted(run_dir: str) -> list[str]:
    """Clean what an interrupted save left (call before any save, on one rank): a
    .tmp-checkpoint-N is removed; a .old-checkpoint-N (a re-save of step N killed between
    its two renames) is removed when checkpoint-N exists, else renamed back to it. Returns
    what was done, for the log."""
    done = []
    if not os.path.isdir(run_dir):
        return done
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if name.startswith(".old-checkpoint-"):
            final = os.path.join(run_dir, name[len(".old-"):])
            if os.path.exists(final):
                shutil.rmtree(path)
                done.append(f"removed {name}")
            else:
                os.replace(path, final)
                done.append(f"restored {name} as {os.path.basename(final)}")
        elif name.startswith(".tmp-checkpoint-"):
            shutil.rmtree(path)
            done.append(f"removed the unfinished {name}")
    return done


def _record_dtype(config_json: str, dtype: torch.dtype) -> None:
    """config.json's dtype = the tensors' (transformers writes the parameters' own, here
    the fp32 masters'), so dtype="auto" loads the checkpoint as it was trained."""
    import json
    with open(config_json) as f:
        cfg = json.load(f)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    with open(config_json, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


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


def rotate_checkpoints(run_dir: str, keep_last: int, keep=()) -> list[str]:
    """Remove all but the newest `keep_last` (>= 1) complete checkpoints and those named in
    `keep` (the best one); returns the paths removed. The newest complete checkpoint is
    never among them, so a crash during a later save can always resume; directories being
    written (.tmp-) and incomplete ones are not touched."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    gone = [os.path.join(run_dir, name) for _, name in _complete(run_dir)[:-keep_last]
            if name not in keep]
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
    from score_fast import distributed
    if optimizer is not None:
        if "optimizer_dcp" in state:
            if not distributed.is_sharded(model):
                raise ValueError(f"{path} was written by an FSDP2 policy (several ranks, or "
                                 f"model.dtype below fp32, or model.offload_optimizer): resume "
                                 f"it with the same model settings")
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                                 get_optimizer_state_dict,
                                                                 set_model_state_dict,
                                                                 set_optimizer_state_dict)
            target = {"optimizer": get_optimizer_state_dict(model, optimizer)}
            if state.get("master"):  # the fp32 master weights under the bf16 safetensors
                target["model"] = get_model_state_dict(model)
            dcp.load(target, checkpoint_id=os.path.join(path, state["optimizer_dcp"]))
            if "model" in target:
                set_model_state_dict(model, target["model"])
            set_optimizer_state_dict(model, optimizer, target["optimizer"])
        elif distributed.is_sharded(model):
            raise ValueError(f"{path} was written by one process without FSDP2 (its optimizer "
                             f"state is one file): resume it with one process and the same "
                             f"model.dtype / model.offload_optimizer")
        else:
            optimizer.load_state_dict(state["optimizer"])
    rank_file = os.path.join(path, f"rng-{dist.rank if dist is not None else 0}.pt")
    if os.path.isfile(rank_file):
        state["rng"] = torch.load(rank_file, map_location="cpu", weights_only=False)
    return state
