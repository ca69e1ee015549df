"""Weave benchmark: Weight Weaving over 20 lambdas vs one merge, for two code trees side by side.

    flock /tmp/bench.lock .venv/bin/python bench/weave_bench.py --experts-dir DIR \
        [--before /tmp/weave-before] [--repeats 2]

Every measurement is one process running bench/merge_bench.py's child (load + merge or weave +
save; peak RSS from wait4) with ``mergeloom`` imported from the tree measured (PYTHONPATH), so
the current tree and ``--before`` (e.g. ``git worktree add /tmp/weave-before HEAD`` made before
a change) are measured in one run, interleaved, and each time is the best of ``--repeats``.
Weaving: 20 lambdas 0.05:1.0:0.05, collaborative; ratio = weave time / one merge (the method's
default lam) of the same tree. ``cpu_s`` (the child's user + system time less its import time)
is recorded beside the wall time: it is less disturbed by other processes on a shared machine.
Results: bench/results/weave_bench.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import merge_bench  # noqa: E402  (the same child and measurement as the merge benchmark)

METHODS = ["task_arithmetic", "ties"]
POOLS = ["mean", "random", "max_abs"]


def run(tree: Path, kind: str, method: str, pool: str, experts: Path, work: Path) -> dict:
    out = work / f"out_{kind}_{method}_{pool}.safetensors"
    # env execs the child in place, so measure() still times and watches that process
    child = [str(ROOT / "bench" / "merge_bench.py"), "--child", kind, method, pool]
    files = ["--experts-dir", str(experts), "--child-out", str(out)]
    cmd = ["env", f"PYTHONPATH={tree}", sys.executable, *child, *files]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = merge_bench.measure(cmd, rss_limit=14.0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child, once waited for
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    out.unlink(missing_ok=True)
    return {**result, "cpu_s": round(cpu - result.get("import_s", 0.0), 2)}


def best(results: list[dict]) -> dict:
    """The fastest run; its cpu_s is the least of all runs."""
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return results[-1]
    return {**min(ok, key=lambda r: r["wall_s"]), "cpu_s": min(r["cpu_s"] for r in ok)}


def table(results: dict, methods: list[str]) -> str:
    lines = [
        "| method | pool | tree | merge s | weave s | weave/merge | weave/merge CPU "
        "| weave peak RSS GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tree, rows in results["trees"].items():
        for method in methods:
            merge = rows[f"{method}/merge"]
            for pool in POOLS:
                weave = rows[f"{method}/{pool}"]
                ratio = weave["wall_s"] / merge["wall_s"]
                cpu_ratio = weave["cpu_s"] / merge["cpu_s"]
                lines.append(
                    f"| {method} | {pool} | {tree} | {merge['wall_s']:.2f} | "
                    f"{weave['wall_s']:.2f} | {ratio:.2f} | {cpu_ratio:.2f} | "
                    f"{weave['peak_rss_gb']:.2f} |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts-dir", type=Path, required=True)
    ap.add_argument("--before", type=Path, default=None, help="tree of the code before a change")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--work-dir", type=Path, default=ROOT / ".bench" / "weave")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "weave_bench.json")
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    trees = {"after": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in trees}
    for _ in range(args.repeats):
        for method in args.methods:
            for kind, pool in [("merge", "-")] + [("weave", p) for p in POOLS]:
                for name, tree in trees.items():
                    key = f"{method}/{'merge' if kind == 'merge' else pool}"
                    result = run(tree, kind, method, pool, args.experts_dir, args.work_dir)
                    runs[name].setdefault(key, []).append(result)
                    print(name, key, result, flush=True)
    memory_gib = psutil.virtual_memory().total / 2**30
    results = {
        "command": "python bench/weave_bench.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{psutil.cpu_count()} CPUs, {memory_gib:.0f} GiB",
        "lambdas": merge_bench.LAMBDAS,
        "collaborative": True,
        "trees": {name: {k: best(v) for k, v in rows.items()} for name, rows in runs.items()},
        "runs": runs,
    }
    results["table"] = table(results, args.methods)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(results["table"])


if __name__ == "__main__":
    main()
