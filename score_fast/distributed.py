"""Data parallelism over torch.distributed, as torchrun sets it up:

    torchrun --nproc-per-node 8 -m score_fast train --config run.yaml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29500 --rdzv-id run1 -m score_fast train --config run.yaml

One process per device (NCCL on GPUs, gloo on CPU). The policy and the frozen reference
are sharded with FSDP2 (`fully_shard`, one unit per decoder layer plus the root), so each
rank holds 1/world of the weights, gradients and AdamW state. The trainer (trainer.py)
splits each step's prompts across ranks (an RLOO group never leaves its rank), gathers the
scored episodes and rebalances them by token count with `balanced_partition`, so every
rank trains on about the same number of tokens.

Without torchrun (WORLD_SIZE unset or 1) there is one process and nothing is gathered or
reduced; FSDP2 still shards (trivially) a one-rank group when it is what gives a full fine-
tune its fp32 master weights under bf16 compute, or the optimizer's CPU offload
(score_fast.models).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup", "allocator_defaults", "shard", "is_sharded", "gather_objects",
           "all_reduce_sum", "barrier", "generation"]


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False
    """the policy is sharded with FSDP2 (always at world > 1)"""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def allocator_defaults() -> None:
    """expandable_segments for torch's CUDA caching allocator unless the user chose its
    settings (PYTORCH_CUDA_ALLOC_CONF, or PYTORCH_ALLOC_CONF, its newer name). Packed
    micro-batches and compacted KV batches change shape every call, and fixed-size segments
    fragment under that: on an H200, a 7B-wide model's bf16 full fine-tune step (bench_memory,
    2026-11-30, default settings) reserved 49.1 GiB for a 42.1 GiB allocated peak, 14% of the
    reservation unused. score_fast.memory's HEADROOM assumes this setting. The allocator
    reads it once, at its first CUDA allocation: setup() calls this before any."""
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def setup(fsdp: bool = False) -> Dist:
    """The process group of a torchrun launch (initialised once), or a one-process Dist;
    fsdp=True gives one process a group of its own (an in-memory store) for FSDP2."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        allocator_defaults()
        if world > 1 and local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} "
                               f"GPUs are visible: lower --nproc-per-node")
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world <= 1:
        if fsdp and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        return Dist(device=device, fsdp=fsdp)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(minutes=30))
    return Dist(dist.get_rank(), dist.get_world_size(), local, device, fsdp=True)


def shard(model, d: Dist, param_dtype: torch.dtype | None = None, offload: bool = False):
    """FSDP2: one unit per decoder layer (found as the model's `layers` ModuleList) and the
    root (embeddings, final norm, LM head). param_dtype: the compute dtype the units are
    gathered in (the sharded parameters keep their own dtype: fp32 master weights), with
    gradients reduced in fp32. offload: parameters, gradients and optimizer state live in
    host memory (CPUOffloadPolicy). No-op unless d.fsdp."""
    if not d.fsdp:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(d.device.type, (d.world,))
    # cast_forward_inputs=False: every float argument of a sharded module's forward stays
    # as the caller made it (the layers get bf16 hidden states from bf16 weights anyway);
    # when the fused loss was a registered method its fp32 reference log-probs were such
    # arguments, and casting them cost a 4e-5 KL at step 0 from rounding alone
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    kw = {"offload_policy": CPUOffloadPolicy(pin_memory=d.device.type == "cuda")} if offload \
        else {}
    from score_fast.flops import decoder_layers
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, **kw)
    fully_shard(model, mesh=mesh, mp_policy=mp, **kw)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def gather_objects(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for episode metadata)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: dict[str, float], d: Dist) -> dict[str, float]:
    """Sum of each value over ranks (float64 on the device)."""
    if not d.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


@contextlib.contextmanager
def generation(model, d: Dist):
    """Sampling calls the model once per token: keep every FSDP unit gathered for the
    whole rollout instead of re-gathering all layers at each decode step, then reshard."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def barrier(d: Dist | None) -> None:
    if d is not None and d.enabled:
        dist.barrier()
