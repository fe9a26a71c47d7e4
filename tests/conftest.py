"""Shared test setup. Triton kernels run in the CPU interpreter unless a GPU run asks
otherwise (bench/gpu_check.sh exports TRITON_INTERPRET=0): the variable must be set
before triton is first imported, so it is set here, before anything imports score_fast."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import ctypes  # noqa: E402
import ctypes.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Peak-memory tests read the RSS high-water mark. glibc raises its mmap threshold after
    each large free (up to 32 MB), after which big tensors come from the heap and can reuse
    pages that are still resident, so an [N, V] allocation could go unseen. A fixed threshold
    (which also turns the dynamic one off) keeps every tensor >= 1 MB in its own mapping,
    returned to the OS on free: RSS then follows the live tensors."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).mallopt(-3, nbytes)  # M_MMAP_THRESHOLD (glibc)
    except (OSError, AttributeError):
        pass


_fixed_mmap_threshold()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and compiled Triton (bench/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_within_rule(out, ref64, baseline, atol, name="output"):
    """The project's accuracy rule: |out - ref64| <= 2 * |baseline - ref64| + atol, where
    `baseline` is plain PyTorch at the same dtype as `out` and `ref64` is computed in fp64.
    Compared as max abs errors; prints max and mean difference on failure."""
    ref64 = ref64.double().cpu()
    out_err = (out.double().cpu() - ref64).abs()
    base_err = (baseline.double().cpu() - ref64).abs()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(out.double().cpu()), finite), (
        f"{name}: non-finite entries differ from the reference")
    o, b = out_err[finite], base_err[finite]
    if o.numel() == 0:
        return
    bound = 2 * b.max().item() + atol
    assert o.max().item() <= bound, (
        f"{name}: max err {o.max().item():.3e} (mean {o.mean().item():.3e}) > bound {bound:.3e} "
        f"(torch max err {b.max().item():.3e}, atol {atol:g})")
