"""score_fast: a kernel-level training engine for SCoRe (Kumar et al., arXiv 2409.12917)."""
from score_fast.packing import PackedBatch, pack, plan_bins

__version__ = "0.1.0"
__all__ = ["PackedBatch", "pack", "plan_bins"]
