"""Analysis benchmark: peak RSS and time of the full task-vector analysis of 8 ViT-B-32 experts.

    .venv/bin/python bench/analysis_bench.py [--experts-dir DIR]

The target (issue 4) is under 4 GB peak RSS for 8 ViT-B-32-sized task vectors. Each run is its
own process (peak RSS from wait4 plus a polling watchdog, as in bench/merge_bench.py). Two runs:
the task vectors as they are (individual), and the chain's increments of the same files taken
as a cumulative sequence (two lazy subtractions per read), which the analyze stage also does.
Experts come from bench/make_experts.py (random ViT-B-32 init + dense noise: real shapes, so
time and memory are real; the correlation values themselves mean nothing here).
Results: bench/results/analysis_bench.json and the table between the markers in BENCHMARKS.md.
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


def child(kind: str, experts_dir: Path) -> None:
    start = time.perf_counter()
    from mergeloom import analysis, vectors

    experts = sorted(experts_dir.glob("expert_*.safetensors"))
    task_vectors = vectors.load_task_vectors(experts_dir / "pretrained.safetensors", experts)
    if kind == "increments":
        task_vectors = analysis.increments(task_vectors)
    timings = {}
    parts = {"correlation": lambda: analysis.correlation(task_vectors),
             "redundancy": lambda: analysis.redundancy(task_vectors, [0.05, 0.1, 0.2]),
             "spectra": lambda: analysis.spectra(task_vectors, [0.01, 0.05, 0.1])}  # fmt: skip
    for part, run in parts.items():
        t0 = time.perf_counter()
        result = run()
        timings[f"{part}_s"] = time.perf_counter() - t0
    timings["wall_s"] = time.perf_counter() - start
    timings["tasks"] = len(task_vectors)
    timings["sti_relative"] = result.get("singular_task_interference", {}).get("relative")
    print(json.dumps(timings))


def markdown(results: dict, command: str) -> str:
    lines = [f"Command: `{command}` (8 ViT-B-32-shaped task vectors, 87.8M parameters each; "
             f"one process per row; target: peak RSS < {LIMIT_GB:g} GB).", "",
             "| input | peak RSS (GB) | correlation (s) | redundancy (s) | spectra (s) | "
             "total in process (s) | status |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind, r in results.items():
        cells = [r.get(k, "-") for k in ("peak_rss_gb", "correlation_s", "redundancy_s",
                                         "spectra_s", "wall_s")]  # fmt: skip
        lines.append(f"| {kind} | " + " | ".join(map(str, cells)) + f" | {r['status']} |")
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
    ap.add_argument("--child", choices=["individual", "increments"], default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.experts_dir)
    if not (args.experts_dir / "pretrained.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_experts.py"), "--out-dir",
                        str(args.experts_dir)], check=True)  # fmt: skip
    results = {}
    for kind in ("individual", "increments"):
        cmd = [sys.executable, __file__, "--child", kind, "--experts-dir", str(args.experts_dir)]
        results[kind] = measure(cmd, rss_limit=3 * LIMIT_GB)
        print(kind, results[kind], flush=True)
    out = ROOT / "bench" / "results" / "analysis_bench.json"
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    update_benchmarks_md(markdown(results, "python bench/analysis_bench.py"))


if __name__ == "__main__":
    main()
