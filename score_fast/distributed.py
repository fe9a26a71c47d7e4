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

Without torchrun (WORLD_SIZE unset or 1) nothing here does anything: one process, no
process group, no sharding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup", "shard", "gather_objects", "all_reduce_sum", "barrier",
           "register_method", "generation"]


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    """The process group of a torchrun launch (initialised once), or a one-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if world > 1 and local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} "
                               f"GPUs are visible: lower --nproc-per-node")
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world <= 1:
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(minutes=30))
    return Dist(dist.get_rank(), dist.get_world_size(), local, device)


def shard(model, d: Dist, bf16: bool = False):
    """FSDP2: one unit per decoder layer (found as the model's `layers` ModuleList) and the
    root (embeddings, final norm, LM head). bf16 (GPU): bf16 compute, fp32 gradient
    reduction and fp32 master weights."""
    if not d.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if bf16 and d.device.type == "cuda" else MixedPrecisionPolicy())
    from score_fast.flops import decoder_layers
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def register_method(model, name: str, d: Dist) -> None:
    """Make `model.<name>` (a bound method computing through the model's weights outside
    its forward, e.g. the fused loss on the LM head) unshard the root's parameters like a
    forward does, and reduce-scatter their gradients in backward."""
    if d.enabled:
        from torch.distributed.fsdp import register_fsdp_forward_method
        register_fsdp_forward_method(model, name)


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
    if not d.enabled:
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


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
