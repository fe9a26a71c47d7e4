"""score_fast: a kernel-level training engine for SCoRe (Kumar et al., arXiv 2409.12917).

The fused losses load lazily on first use (importing triton takes ~1 s, and `import
score_fast` for packing alone should not pay it)."""
import importlib

from score_fast.packing import PackedBatch, balanced_partition, pack, plan_bins

__version__ = "0.1.0"

_LAZY = {  # public name -> module under score_fast.kernels
    "token_logprobs": "token_logprobs",
    "kl_penalty": "kl_penalty",
    "score_advantages": "score_advantages",
    "score_loss": "score_loss",
    "linear_logprobs": "linear_logprobs",
    "linear_score_loss": "linear_score_loss",
}
_LAZY_API = {"Trainer": "score_fast.trainer", "Config": "score_fast.config"}
__all__ = ["PackedBatch", "balanced_partition", "pack", "plan_bins", *_LAZY, *_LAZY_API]


def __getattr__(name):
    if name in _LAZY or name in _LAZY_API:
        module = _LAZY_API.get(name) or f"score_fast.kernels.{_LAZY[name]}"
        fn = getattr(importlib.import_module(module), name)
        globals()[name] = fn
        return fn
    raise AttributeError(f"module 'score_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
