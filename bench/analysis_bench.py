"""Analysis benchmark: peak RSS and time of the full task-vector analysis of 8 ViT-B-32 experts.

    .venv/bin/python bench/analysis_bench.py [--experts-dir DIR] [--json-only]

The targets are under 4 GB peak RSS (issue 4), and 300 s at under 2 GB (issue 13), for 8
ViT-B-32-sized task vectors. Each run is its own process (peak RSS from wait4 plus a polling
watchdog, as in bench/merge_bench.py). Inputs: the task vectors as they are (individual), and
the chain's increments of the same files taken as a cumulative sequence (two lazy subtractions
per read), which the analyze stage also does. Modes: "parts" times correlation, redundancy and
spectra each on its own (each reads the task vectors itself); "describe" is what the analyze
stage runs, every measure from one shared pass.
Experts come from bench/make_experts.py (random ViT-B-32 init + dense noise: real shapes, so
time and memory are real; the correlation values themselves mean nothing here).
Results: bench/results/analysis_bench.json and, unless --json-only, the table between the
markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from merge_bench import ROOT, measure

MARK_START, MARK_END = "<!-- analysis_bench:start -->", "<!-- analysis_bench:end -->"
LIMIT_GB = 4.0


TOPK, ENERGY_TOP = [0.05, 0.1, 0.2], [0.01, 0.05, 0.1]
MODES = ("parts", "describe")


def child(kind: str, mode: str, experts_dir: Path) -> None:
    start = time.perf_counter()
    from mergeloom import analysis, vectors

    experts = sorted(experts_dir.glob("expert_*.safetensors"))
    task_vectors = vectors.load_task_vectors(experts_dir / "pretrained.safetensors", experts)
    if kind == "increments":
        task_vectors = analysis.increments(task_vectors)
    timings = {}
    parts = {"correlation": lambda: analysis.correlation(task_vectors),
             "redundancy": lambda: analysis.redundancy(task_vectors, TOPK),
             "spectra": lambda: analysis.spectra(task_vectors, ENERGY_TOP)}  # fmt: skip
    if mode == "describe":
        parts = {"describe": lambda: analysis.describe(task_vectors, topk=TOPK,
                                                       energy_top=ENERGY_TOP)}  # fmt: skip
    for part, run in parts.items():
        t0 = time.perf_counter()
        result = run()
        timings[f"{part}_s"] = time.perf_counter() - t0
    timings["wall_s"] = time.perf_counter() - start
    timings["tasks"] = len(task_vectors)
    result = result.get("spectra", result)
    timings["sti_relative"] = result.get("singular_task_interference", {}).get("relative")
    print(json.dumps(timings))


def markdown(results: dict, command: str) -> str:
    lines = [f"Command: `{command}` (8 ViT-B-32-shaped task vectors, 87.8M parameters each; "
             f"one process per row; targets: peak RSS < {LIMIT_GB:g} GB (issue 4), <= 300 s at "
             "<= 2 GB (issue 13)).", "",
             "| input | mode | peak RSS (GB) | correlation (s) | redundancy (s) | spectra (s) | "
             "describe (s) | total in process (s) | status |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        kind, _, mode = name.partition("/")
        cells = [r.get(k, "-") for k in ("peak_rss_gb", "correlation_s", "redundancy_s",
                                         "spectra_s", "describe_s", "wall_s")]  # fmt: skip
        lines.append(f"| {kind} | {mode} | " + " | ".join(map(str, cells)) + f" | {r['status']} |")
    return "\n".join(lines)


def update_benchmarks_md(table: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    if MARK_START not in text:
        text += f"\n## Task-vector analysis\n\n{MARK_START}\n{MARK_END}\n"
    head, _, rest = text.partition(MARK_START)
    _, _, tail = rest.partition(MARK_END)
    path.write_text(f"{head}{MARK_START}\n{table}\n{MARK_END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts-dir", type=Path, default=Path("/tmp/mlbench/experts"))
    ap.add_argument("--child", nargs=2, metavar=("INPUT", "MODE"), default=None)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--json-only", action="store_true", help="leave BENCHMARKS.md untouched")
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.experts_dir)
    if not (args.experts_dir / "pretrained.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_experts.py"), "--out-dir",
                        str(args.experts_dir)], check=True)  # fmt: skip
    results = {}
    for kind in ("individual", "increments"):
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--child", kind, mode, "--experts-dir",
                   str(args.experts_dir)]  # fmt: skip
            results[f"{kind}/{mode}"] = measure(cmd, rss_limit=3 * LIMIT_GB)
            print(kind, mode, results[f"{kind}/{mode}"], flush=True)
    out = ROOT / "bench" / "results" / "analysis_bench.json"
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    table = markdown(results, " ".join(["python bench/analysis_bench.py", *sys.argv[1:]]))
    print(table)
    if not args.json_only:
        update_benchmarks_md(table)


if __name__ == "__main__":
    main()
