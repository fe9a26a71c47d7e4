"""Compile gate: every Triton kernel, at every launch its launcher makes on a GPU, compiled
ahead of time for real GPUs on a machine without one, with registers, spills, shared memory
and MMA instructions reported.

    python bench/compile_gate.py                     # gate + bench/results/kernel_report.md
    python bench/compile_gate.py --targets 90        # one target (80, 90, 100)
    python bench/compile_gate.py --module FILE.py --no-package   # check one file's kernels

How launches are found: each file in kernels/ with a @triton.jit kernel (an op file, or a
shared module such as _lmhead.py) has `_gate_cases()` right after its launch configuration,
yielding zero-argument calls of its launchers on meta tensors of real shapes (no data, no
device). The gate runs each call with JITFunction.run replaced by
a recorder, then turns every recorded launch into Triton's own (signature, constexprs,
attrs, options) -- the binder and _pack_args a GPU launch uses, so pointer dtypes, the
16-byte alignment and integer specialisations are what a GPU would compile -- and compiles
it with triton.compile for sm_80 (A100), sm_90a (H100/H200) and sm_100a (B200). Triton
runs the wheel's ptxas on each; its -v log gives registers and spills.

Fails (exit 1) on: a compile error; shared memory above the target's per-block limit;
register spills beyond the file's `_GATE_SPILLS` allowance ({(kernel, "sm_80"): bytes});
a kernel (a @triton.jit function no other kernel calls) that no case launches; a kernel
file without `_gate_cases`. TRITON_INTERPRET must be unset: the interpreter replaces the
kernels with objects Triton cannot compile.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import importlib.util
import io
import multiprocessing as mp
import os
import pkgutil
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Triton 3.9 warns that FP fusion's default will flip; the gate compiles what a launch
# compiles today (fusion on), quietly
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

try:  # Triton's own launch-time binder (checked with triton 3.6 and 3.9)
    from triton.runtime.jit import create_function_from_signature  # noqa: E402
except ImportError:  # pragma: no cover - an older or reorganised Triton
    create_function_from_signature = None

ARCH = {80: "sm_80", 90: "sm_90a", 100: "sm_100a"}
GPU = {80: "A100", 90: "H100/H200", 100: "B200"}
# Per-block shared memory a kernel may opt into, and per SM (CUDA programming guide,
# compute capabilities table): 163 KB / 164 KB on sm_80, 227 KB / 228 KB on sm_90 and
# sm_100. Each resident block also reserves 1 KB of the SM's shared memory.
SMEM_BLOCK = {80: 166912, 90: 232448, 100: 232448}
SMEM_SM = {80: 167936, 90: 233472, 100: 233472}
REGS_SM, WARPS_SM, BLOCKS_SM = 65536, 64, 32  # the same on sm_80, sm_90 and sm_100
MIN_TRITON = {100: (3, 3)}  # first release with Blackwell (tcgen05) code generation


@dataclass
class Launch:
    """One distinct launch: the kernel, and what triton.compile needs for it."""
    module: str
    kernel: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    opts: dict  # the launch's own options: num_warps, num_stages, ...
    allowed_spill: dict = field(default_factory=dict)  # arch -> bytes

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def variant(self) -> str:
        """Short description: float pointer dtypes, constexprs, warps and stages."""
        ptr = [v[1:] for k, v in self.signature.items() if v.startswith("*")]
        floats = sorted({p for p in ptr if p[:2] in ("fp", "bf")}, key=ptr.index)
        names = self.kernel.arg_names
        consts = [f"{names[k[0]]}={v}" for k, v in self.constexprs.items()
                  if v is not None and self.signature[names[k[0]]] == "constexpr"]
        # integer arguments Triton specialised as divisible by 16 (pointers always are here)
        div = [names[k[0]] for k, v in self.attrs.items()
               if not self.signature[names[k[0]]].startswith("*") and "tt.divisibility" in str(v)]
        warps = f"w{self.opts.get('num_warps', 4)}"
        stages = f"s{self.opts['num_stages']}" if "num_stages" in self.opts else ""
        return " ".join(["/".join(floats)] + consts + ([f"div16({','.join(div)})"] if div else [])
                        + [warps + stages])


# ------------------------------------------------------------------------ find launches
def kernel_modules(package: bool, files: list[str]) -> list:
    mods = []
    if package:
        import score_fast.kernels as pkg
        for info in pkgutil.iter_modules(pkg.__path__):
            mods.append(importlib.import_module(f"{pkg.__name__}.{info.name}"))
    for f in files:
        name = "_gate_" + Path(f).stem
        spec = importlib.util.spec_from_file_location(name, f)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


def jit_kernels(mod) -> list[JITFunction]:
    """The module's own @triton.jit functions that no other one calls: its kernels."""
    own = [v for v in vars(mod).values()
           if isinstance(v, JITFunction) and v.fn.__module__ == mod.__name__]
    return [k for k in own
            if not any(re.search(rf"\b{k.__name__}\(", o.src) for o in own if o is not k)]


@contextlib.contextmanager
def recording(calls: list):
    """JITFunction.run records (kernel, args, kwargs) instead of launching."""
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))
    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = run


def to_launch(mod, kernel, args, kwargs) -> Launch:
    """Triton's own specialisation of a recorded launch, for a CUDA target."""
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, spec, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, options)
    opts = {k: v for k, v in kwargs.items()
            if k not in kernel.arg_names and k != "debug"}
    allowed = {arch: b for (name, arch), b in getattr(mod, "_GATE_SPILLS", {}).items()
               if name == kernel.__name__}
    return Launch(mod.__name__, kernel, signature, constexprs, attrs, opts, allowed)


def find_launches(mods) -> tuple[list[Launch], list[str]]:
    launches, errors, seen = [], [], set()
    for mod in mods:
        kernels = jit_kernels(mod)
        if not kernels:
            continue
        cases = getattr(mod, "_gate_cases", None)
        if cases is None:
            errors.append(f"{mod.__name__}: defines kernels "
                          f"{[k.__name__ for k in kernels]} but no _gate_cases()")
            continue
        launched = set()
        for case in cases():
            calls = []
            with recording(calls):
                case()
            for kernel, args, kwargs in calls:
                launch = to_launch(mod, kernel, args, kwargs)
                launched.add(kernel.__name__)
                key = (launch.name, repr(launch.signature), repr(launch.constexprs),
                       repr(launch.attrs), repr(launch.opts))
                if key not in seen:
                    seen.add(key)
                    launches.append(launch)
        for k in kernels:
            if k.__name__ not in launched:
                errors.append(f"{mod.__name__}.{k.__name__}: no _gate_cases() call launches "
                              "it, so no GPU compile checks it")
    return launches, errors


# ----------------------------------------------------------------------------- compile
_LAUNCHES: list[Launch] = []  # set before the worker pool forks


def _ptxas_stats(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(regs=int(regs[-1]) if regs else None,
                spill_st=int(spill[-1][0]) if spill else 0,
                spill_ld=int(spill[-1][1]) if spill else 0)


def _error_text(e: Exception) -> str:
    """One line: Triton's CompilationError is 'at L:C:', the source, a caret line and the
    message; others (a ptxas failure) keep their first lines."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    caret = [i for i, ln in enumerate(lines) if set(ln.strip()) == {"^"}]
    if caret and caret[-1] > 0:
        i = caret[-1]
        where = lines[0].rstrip(":") if lines[0].startswith("at ") else ""
        return (f"{type(e).__name__} {where} in `{lines[i - 1].strip()}`: "
                + " ".join(lines[i + 1:])[:400])
    return f"{type(e).__name__}: " + " | ".join(lines[:4])[:400]


def compile_one(job: tuple[int, int]) -> dict:
    i, cap = job
    launch = _LAUNCHES[i]
    out = dict(index=i, cap=cap)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v, printed by Triton
        with contextlib.redirect_stdout(log):
            k = triton.compile(
                ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs),
                target=GPUTarget("cuda", cap, 32), options=dict(launch.opts))
    except Exception as e:  # noqa: BLE001 - any compile failure is the gate's finding
        out["error"] = _error_text(e)
        return out
    ptx = k.asm["ptx"]
    mma = [n for n, pat in (("wgmma", "wgmma.mma_async"), ("tcgen05", "tcgen05.mma"),
                            ("mma.sync", "mma.sync")) if pat in ptx]
    out.update(_ptxas_stats(log.getvalue()), smem=int(k.metadata.shared),
               mma="+".join(mma) or "-", seconds=time.perf_counter() - t0,
               warps=int(k.metadata.num_warps))
    return out


def occupancy(r: dict, cap: int) -> int:
    """Resident warps per SM from registers (allocated per warp in units of 256), shared
    memory (+1 KB reserved per block) and the warp and block limits."""
    warps = r["warps"]
    per_warp = -(-r["regs"] * 32 // 256) * 256
    blocks = min(REGS_SM // (per_warp * warps), SMEM_SM[cap] // (r["smem"] + 1024),
                 WARPS_SM // warps, BLOCKS_SM)
    return blocks * warps


def check(launch: Launch, r: dict) -> str | None:
    arch = ARCH[r["cap"]]
    if "error" in r:
        return f"compile error: {r['error']}"
    if r["smem"] > SMEM_BLOCK[r["cap"]]:
        return f"shared memory {r['smem']} B > {SMEM_BLOCK[r['cap']]} B per block on {arch}"
    spill = r["spill_st"] + r["spill_ld"]
    if spill > launch.allowed_spill.get(arch, 0):
        return (f"spills {r['spill_st']} B stored / {r['spill_ld']} B loaded at {r['regs']} "
                f"registers (allowed {launch.allowed_spill.get(arch, 0)} B: _GATE_SPILLS)")
    return None


def supported(cap: int) -> bool:
    have = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    return have >= MIN_TRITON.get(cap, (0, 0))


def summary(launches, results, caps) -> list[str]:
    """Per kernel and target: ranges over its launches (variants)."""
    rows = ["## Per kernel (ranges over its variants)", "",
            "| kernel | variants | target | regs | max spill | smem | MMA | occ |",
            "|---|---|---|---|---|---|---|---|"]
    span = lambda v: f"{min(v)}" if min(v) == max(v) else f"{min(v)}-{max(v)}"  # noqa: E731
    by = {}
    for r in results:
        la = launches[r["index"]]
        by.setdefault((la.module.rsplit(".", 1)[-1] + "." + la.name, r["cap"]), []).append(r)
    for (name, cap), rs in sorted(by.items()):
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append(f"| {name} | {len(rs)} | {ARCH[cap]} | compile errors | | | | |")
            continue
        mma = "+".join(sorted({r["mma"] for r in ok}))
        rows.append(f"| {name} | {len(rs)} | {ARCH[cap]} | {span([r['regs'] for r in ok])} | "
                    f"{max(r['spill_st'] + r['spill_ld'] for r in ok)} | "
                    f"{span([r['smem'] for r in ok])} | {mma} | "
                    f"{span([occupancy(r, cap) for r in ok])} |")
    return rows


def report(launches, results, failures, seconds, caps) -> str:
    lines = [
        "# Triton kernels compiled for GPUs (compile gate)",
        "",
        f"`python bench/compile_gate.py`: triton {triton.__version__}, "
        f"{len(launches)} launches x {len(caps)} targets in {seconds:.0f} s, "
        f"{len(failures)} failures. Targets: "
        + ", ".join(f"{ARCH[c]} ({GPU[c]})" for c in caps) + ".",
        "",
        "regs: registers per thread; spill: bytes stored/loaded by ptxas spills; smem: "
        "shared memory per block; MMA: tensor-core instructions in the PTX; occ: resident "
        "warps per SM of 64 (from registers, shared memory and block limits).",
        "",
    ]
    lines += summary(launches, results, caps) + [
        "",
        "## Every launch",
        "",
        "| kernel | variant | target | regs | spill | smem | MMA | occ | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (launches[r["index"]].module,
                                            launches[r["index"]].name, r["index"], r["cap"])):
        la = launches[r["index"]]
        bad = failures.get((r["index"], r["cap"]))
        name = f"{la.module.rsplit('.', 1)[-1]}.{la.name}"
        if "error" in r:
            lines.append(f"| {name} | {la.variant()} | {ARCH[r['cap']]} | | | | | | {bad} |")
            continue
        status = bad or "ok"
        lines.append(f"| {name} | {la.variant()} | {ARCH[r['cap']]} | {r['regs']} | "
                     f"{r['spill_st']}/{r['spill_ld']} | {r['smem']} | {r['mma']} | "
                     f"{occupancy(r, r['cap'])} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="80,90,100",
                    help="compute capabilities: 80 (sm_80), 90 (sm_90a), 100 (sm_100a)")
    ap.add_argument("--module", action="append", default=[],
                    help="also check this kernel file (repeatable)")
    ap.add_argument("--no-package", action="store_true", help="skip score_fast.kernels")
    ap.add_argument("--report", default=None,
                    help="markdown report path (default bench/results/kernel_report.md "
                         "when the package is checked)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if create_function_from_signature is None or not hasattr(JITFunction, "_pack_args"):
        ap.exit(2, f"compile_gate: triton {triton.__version__} lacks the launch binder the gate "
                   f"reuses (create_function_from_signature, JITFunction._pack_args: "
                   f"triton 3.6 and 3.9 have them)\n")
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        ap.exit(2, "compile_gate: unset TRITON_INTERPRET (the interpreter's kernels cannot be "
                   "compiled for a GPU)\n")

    caps = [int(c) for c in args.targets.split(",")]
    for c in caps:
        if c not in ARCH:
            ap.error(f"unknown target {c}: use 80, 90 or 100")
    skipped = [c for c in caps if not supported(c)]
    caps = [c for c in caps if c not in skipped]
    for c in skipped:
        print(f"{ARCH[c]}: skipped, triton {triton.__version__} cannot target it")

    t0 = time.perf_counter()
    launches, errors = find_launches(kernel_modules(not args.no_package, args.module))
    _LAUNCHES[:] = launches
    # a fresh cache: every launch goes through ptxas, whose log has the register counts
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_gate_")
    # dot kernels first: they take longest, so the pool ends evenly
    jobs = sorted(((i, c) for i in range(len(launches)) for c in caps),
                  key=lambda j: "tl.dot" not in launches[j[0]].kernel.src)
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
        results = list(pool.map(compile_one, jobs))
    seconds = time.perf_counter() - t0

    failures = {}
    for r in results:
        bad = check(launches[r["index"]], r)
        if bad:
            failures[(r["index"], r["cap"])] = bad
    text = report(launches, results, failures, seconds, caps)
    path = args.report or (None if args.no_package else
                           str(Path(__file__).parent / "results" / "kernel_report.md"))
    if path:
        Path(path).write_text(text)
    n_kernels = len({(la.module, la.name) for la in launches})
    print(f"compile gate: {n_kernels} kernels, {len(launches)} launches x {len(caps)} targets "
          f"({', '.join(ARCH[c] for c in caps)}), triton {triton.__version__}, "
          f"{seconds:.1f} s" + (f", report {path}" if path else ""))
    for e in errors:
        print(f"FAIL {e}")
    for (i, c), bad in failures.items():
        la = launches[i]
        print(f"FAIL {la.module}.{la.name} [{la.variant()}] on {ARCH[c]}: {bad}")
    return 1 if errors or failures else 0


if __name__ == "__main__":
    sys.exit(main())
