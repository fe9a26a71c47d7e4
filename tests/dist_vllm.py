"""Worker for tests/test_vllm.py, run as
    torchrun --nproc-per-node 2 tests/dist_vllm.py RUN_CONFIG.yaml OUT.pt
Trains the run's steps with rollout.backend=vllm (engines of rollout.vllm.tensor_parallel_size
ranks, synced after every step), then every rank decodes the same fixed contexts greedily;
rank 0 saves every rank's outputs, engine statistics and rows of its served q/k/v matrix,
and the policy's full weights to OUT.pt."""
import sys

import torch
import yaml

from score_fast import distributed
from score_fast.config import config_from_dict
from score_fast.trainer import Trainer

CONTEXTS = [[1, 12, 7, 30, 5], [1, 9, 9], [1, 3, 40, 22, 8, 8, 6]]


def main(config_path: str, out_path: str) -> None:
    with open(config_path) as f:
        config = config_from_dict(yaml.safe_load(f))
    tr = Trainer(config)
    hist = tr.train(progress=False)
    mine = tr.engine.generate(CONTEXTS, max_new_tokens=12, temperature=1.0, greedy=True,
                              eos=tr.tokenizer.eos_token_id)
    served = tr.engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    # this rank's share of the stacked q/k/v projection: under tensor parallelism a slice
    # (the CPU backend repacks the weight itself, so its rows are read from the layer)
    qkv_rows = served.model.layers[0].self_attn.qkv_proj.output_size_per_partition
    parts = distributed.gather_objects((mine, dict(tr.engine.stats), qkv_rows), tr.dist)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(tr.policy, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    if tr.dist.main:
        torch.save({"outputs": [p[0] for p in parts], "stats": [p[1] for p in parts],
                    "qkv_rows": [p[2] for p in parts],
                    "steps": [m["step"] for m in hist],
                    "sync_s": [m["engine_sync_s"] for m in hist],
                    "state": {k: v.clone() for k, v in full.items()}}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
