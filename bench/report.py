"""Turn pytest-benchmark JSON into CSV rows under bench/results/ and a markdown table.

    python bench/report.py run.json [--out DIR]

One CSV per benchmark file (bench/results/<file>.csv, rows appended, header once) with the
columns below, and the markdown table printed and written beside it (<file>.md, last run).
`ratio` is the median of the row's baseline provider (same benchmark and shape) over this
row's median: 30.0 means 30x faster than the baseline. `bw_vs_copy` is the row's GB/s over
that of the `copy` provider (a plain device copy) in the same run, where there is one."""
import argparse
import csv
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from harness import git_commit  # noqa: E402

COLUMNS = ["benchmark", "provider", "shape", "dtype", "median_ms", "p20_ms", "p80_ms",
           "ratio", "gbps", "bw_vs_copy", "tflops", "peak_mem_mb", "extra", "device", "commit",
           "date"]
KNOWN = {"provider", "shape", "dtype", "baseline", "bytes", "flops", "peak_mem", "device"}


def _quantile(data, q):
    data = sorted(data)
    return data[min(len(data) - 1, int(q * len(data)))]


def rows_from(report: dict) -> dict[str, list[dict]]:
    date = report.get("datetime", datetime.datetime.now(datetime.timezone.utc).isoformat())
    commit = git_commit()
    by_file, medians = {}, {}
    for b in report["benchmarks"]:
        info, stats = b["extra_info"], b["stats"]
        data = stats.get("data") or [stats["median"]]
        name = b["name"].split("[")[0].removeprefix("test_")
        key = (b["fullname"].split("::")[0], name, info.get("shape", ""), info.get("dtype", ""))
        medians[key + (info.get("provider", ""),)] = stats["median"]
        extra = ";".join(f"{k}={v}" for k, v in info.items() if k not in KNOWN)
        row = {
            "benchmark": name, "provider": info.get("provider", ""), "shape": info.get("shape", ""),
            "dtype": info.get("dtype", ""), "median_ms": stats["median"] * 1e3,
            "p20_ms": _quantile(data, 0.2) * 1e3, "p80_ms": _quantile(data, 0.8) * 1e3,
            "gbps": info.get("bytes", 0) / stats["median"] / 1e9 if info.get("bytes") else "",
            "tflops": info.get("flops", 0) / stats["median"] / 1e12 if info.get("flops") else "",
            "peak_mem_mb": info["peak_mem"] / 2**20 if info.get("peak_mem", -1) >= 0 else "",
            "extra": extra, "device": info.get("device", ""), "commit": commit, "date": date,
            "_key": key, "_baseline": info.get("baseline", ""),
        }
        by_file.setdefault(os.path.basename(key[0]).removesuffix(".py"), []).append(row)
    for rows in by_file.values():
        copy_gbps = {r["_key"]: r["gbps"] for r in rows if r["provider"] == "copy" and r["gbps"]}
        for r in rows:
            base = medians.get(r["_key"] + (r["_baseline"],))
            r["ratio"] = base / (r["median_ms"] / 1e3) if base else ""
            copy = copy_gbps.get(r["_key"])
            r["bw_vs_copy"] = r["gbps"] / copy if copy and r["gbps"] != "" else ""
    return by_file


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict]) -> str:
    cols = ["benchmark", "shape", "dtype", "provider", "median_ms", "p20_ms", "p80_ms", "ratio",
            "gbps", "bw_vs_copy", "tflops", "peak_mem_mb", "extra"]
    cols = [c for c in cols if any(r[c] != "" for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["benchmark"], r["_key"][2], r["provider"])):
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    device = rows[0]["device"] if rows else ""
    return f"Device: {device}; ratio = baseline median / median.\n\n" + "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark --benchmark-json output")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
        os.path.dirname(__file__), "results"), help="folder for the CSV and markdown files")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        by_file = rows_from(json.load(f))
    os.makedirs(args.out, exist_ok=True)
    for stem, rows in sorted(by_file.items()):
        path = os.path.join(args.out, f"{stem}.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
        table = markdown(rows)
        with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
            f.write(f"# {stem}\n\n{table}")
        print(f"\n## {stem} ({path})\n\n{table}")


if __name__ == "__main__":
    main()
