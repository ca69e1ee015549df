"""Parallel benchmark: serial `dvc repro` vs `mergeloom repro --jobs N` from a cold cache, and the
engine's overhead per stage.

    flock /tmp/bench.lock .venv/bin/python bench/parallel_bench.py [--rounds 3] [--jobs 2] \
        [--small] [--skip-overhead] [--skip-pipeline] [--overhead-rounds 3] [--note TEXT] \
        [--out bench/results/parallel_bench.json]

Pipeline: every round makes two fresh clones of this repository's HEAD (empty .dvc/cache, so no
run-cache either: a cold start) and runs the embedded default (``--small``: the reduced test
params, tests/fixtures/params_small.yaml) serially in one and with ``--jobs N`` in the other,
alternating which goes first; ratio = parallel / serial wall time, per round and the median.
Each pair is also checked to end with the same dvc.lock bytes.

Overhead: a repo of ``STAGES`` empty stages (``echo > file``, independent), run from scratch
each time, ``ROUNDS_OVERHEAD`` times alternating: through the engine with one worker, through
one ``dvc repro --single-item <stage>`` per stage (what the engine runs), and through one
``dvc repro``. The engine's fixed cost (cluster start, graph) is its time with one stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "tests" / "fixtures" / "params_small.yaml"
STAGES = 8
ROUNDS_OVERHEAD = 3
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "MERGELOOM_DEVICE": "cpu",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.com",
       "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.com"}  # fmt: skip
DVC = [sys.executable, "-m", "dvc"]
ENGINE = [sys.executable, "-m", "mergeloom.cli", "repro"]


def sh(cwd: Path, *cmd: str) -> float:
    """Runs ``cmd``; its wall time in seconds. A failure stops the benchmark with its output."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def clone(work: Path, name: str, small: bool) -> Path:
    """A fresh clone of HEAD: no .dvc/cache, no run-cache, no outputs."""
    repo = work / name
    sh(work, "git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(repo))
    if small:
        shutil.copy(SMALL, repo / "params.yaml")
        sh(repo, sys.executable, "-m", "stages.pipeline")
    return repo


def pipeline_rounds(rounds: int, jobs: int, small: bool, work: Path) -> list[dict]:
    results = []
    for index in range(rounds):
        order = ["serial", "parallel"] if index % 2 == 0 else ["parallel", "serial"]
        times, repos = {}, {}
        for kind in order:
            repo = repos[kind] = clone(work, f"{kind}{index}", small)
            cmd = [*DVC, "repro"] if kind == "serial" else [*ENGINE, "--jobs", str(jobs)]
            times[kind] = sh(repo, *cmd)
            print(f"round {index + 1}: {kind} {times[kind]:.1f} s", flush=True)
        same = (repos["serial"] / "dvc.lock").read_bytes() == (
            repos["parallel"] / "dvc.lock"
        ).read_bytes()
        results.append({"first": order[0], "serial_s": round(times["serial"], 1),
                        "parallel_s": round(times["parallel"], 1),
                        "ratio": round(times["parallel"] / times["serial"], 3),
                        "same_dvc_lock": same})  # fmt: skip
        for repo in repos.values():
            shutil.rmtree(repo)
    return results


def empty_stages(work: Path, name: str, count: int) -> Path:
    repo = work / name
    repo.mkdir()
    lines = ["stages:"]
    for i in range(count):
        lines += [f"  s{i}:", f"    cmd: echo {i} > out{i}.txt", f"    outs: [out{i}.txt]"]
    (repo / "dvc.yaml").write_text("\n".join(lines) + "\n")
    sh(repo, "git", "init", "-q")
    sh(repo, *DVC, "init", "-q")
    return repo


def overhead(work: Path, rounds: int = ROUNDS_OVERHEAD) -> dict:
    """Seconds per empty stage by each route, and the engine's fixed cost (one stage)."""
    ways = {
        "engine_jobs1": lambda repo, n: sh(repo, *ENGINE, "--jobs", "1"),
        "dvc_single_item_each": lambda repo, n: sum(
            sh(repo, *DVC, "repro", "--single-item", f"s{i}") for i in range(n)
        ),
        "dvc_repro_all": lambda repo, n: sh(repo, *DVC, "repro"),
    }
    times: dict[str, list[float]] = {f"{way}/{n}": [] for way in ways for n in (1, STAGES)}
    for round_index in range(rounds):
        names = list(ways) if round_index % 2 == 0 else list(reversed(ways))
        for way in names:
            for n in (1, STAGES):
                repo = empty_stages(work, f"{way}{round_index}_{n}", n)
                times[f"{way}/{n}"].append(ways[way](repo, n))
                shutil.rmtree(repo)
    median = {key: statistics.median(values) for key, values in times.items()}
    per_stage = {way: round(median[f"{way}/{STAGES}"] / STAGES, 2) for way in ways}
    marginal = {
        way: round((median[f"{way}/{STAGES}"] - median[f"{way}/1"]) / (STAGES - 1), 2)
        for way in ways
    }
    return {
        "stages": STAGES,
        "rounds": rounds,
        "median_s": {key: round(value, 2) for key, value in median.items()},
        "per_stage_s": per_stage,
        "marginal_per_stage_s": marginal,
        "engine_minus_dvc_single_item_per_stage_s": round(
            marginal["engine_jobs1"] - marginal["dvc_single_item_each"], 2
        ),
        "engine_fixed_s": round(median["engine_jobs1/1"] - median["dvc_single_item_each/1"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="the reduced test params")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--overhead-rounds", type=int, default=ROUNDS_OVERHEAD)
    parser.add_argument("--note", default="", help="recorded as is, e.g. what else ran")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/parallel_bench.json")
    args = parser.parse_args()
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "params": "tests/fixtures/params_small.yaml" if args.small else "params.yaml",
        "jobs": args.jobs,
        "note": args.note,
        "load_average_at_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="parallel_bench_") as tmp:
        work = Path(tmp)
        if not args.skip_overhead:
            result["overhead"] = overhead(work, args.overhead_rounds)
            print(json.dumps(result["overhead"], indent=1), flush=True)
        if not args.skip_pipeline:
            rounds = pipeline_rounds(args.rounds, args.jobs, args.small, work)
            result["rounds"] = rounds
            result["ratio_median"] = statistics.median(r["ratio"] for r in rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
