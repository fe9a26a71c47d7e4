"""score_fast: a kernel-level training engine for SCoRe (Kumar et al., arXiv 2409.12917).

The fused losses load lazily on first use (importing triton takes ~1 s, and `import
score_fast` for packing alone should not pay it)."""
import importlib
import importlib.machinery
import importlib.util
import os
import sys


def _register_tree_kernels():
    """score_fast.kernels is the tree's top-level kernels/ folder. That folder has no
    __init__.py, so that `import kernels` from the repo root (transformers >= 5.25 imports
    PyPI's `kernels`; `python -m` puts the current folder first on sys.path) never finds it:
    a folder without __init__.py only counts when no real package has the name. A wheel
    ships the folder as score_fast/kernels/; a source tree or an editable install has none
    there (setuptools' editable finder serves no namespace package inside a regular one), so
    the folder is registered here by path: no file is read, nothing is imported."""
    here = os.path.dirname(os.path.abspath(__file__))
    tree = os.path.join(os.path.dirname(here), "kernels")
    if os.path.isdir(os.path.join(here, "kernels")) or not os.path.isdir(tree):
        return
    spec = importlib.machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [tree]
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    setattr(sys.modules[__name__], "kernels", module)  # what importing it would have set


_register_tree_kernels()

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
