"""Worker for tests/test_distributed.py, run as
    torchrun --nproc-per-node N tests/dist_step.py RUN_CONFIG.yaml OUT.pt
or in one plain process (no torchrun). One optimizer step of the Trainer on a fixed global
batch of episodes (the same on every rank; with train.single_turn their attempt 1 only, as
such a step samples them); rank 0 saves the loss and the full updated weights to OUT.pt."""
import sys

import torch
import yaml

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # tests/helpers.py: the fixed episodes
from score_fast.config import config_from_dict  # noqa: E402
from score_fast.objective import plan_objective  # noqa: E402
from score_fast.trainer import Trainer  # noqa: E402


def main(config_path: str, out_path: str) -> None:
    with open(config_path) as f:
        config = config_from_dict(yaml.safe_load(f))
    tr = Trainer(config)
    from helpers import fixed_episodes
    eps = fixed_episodes(tr.tokenizer) * 4  # 12 episodes, 6 prompt groups, 3 lengths
    for i, e in enumerate(eps):
        e.prompt_index = i // 2
    r1 = torch.tensor([1.0, 0.0, 0.0] * 4)
    r2 = torch.tensor([0.0, 1.0, 1.0, 1.0] * 3)
    single = config.train.single_turn
    if single:  # [prompt | attempt 1]: no instruction, no attempt 2
        from score_fast.rollout import Episode
        eps = [Episode(e.prompt_index, e.prompt_ids, e.attempt1_ids, []) for e in eps]
    group = torch.tensor([e.prompt_index for e in eps])
    obj = plan_objective(config, 2, r1, None if single else r2, group)
    out, norm = tr.optimize(eps, obj)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(tr.policy, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    if tr.dist.main:
        torch.save({"loss": out["loss"], "norm": norm, "n1": out["n1"], "n2": out["n2"],
                    "tokens": out["tokens"],
                    "state": {k: v.clone() for k, v in full.items()}}, out_path)
    if tr.dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
