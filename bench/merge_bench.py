"""Merge benchmark: wall time and peak RSS of every method on 8 ViT-B-32-shaped experts.

    .venv/bin/python bench/merge_bench.py [--fusionbench] [--methods ties tsv_m ...]
        [--baseline-src DIR] [--no-weave] [--no-markdown] [--device cuda]

Each measurement runs in its own process (peak RSS from wait4, a watchdog kills runs above
--rss-limit-gb and records where), right after a read of every input file, so both tools start
from a warm page cache whatever ran before. "wall_s" is load + merge + save inside the
process, without interpreter and import start-up, for us and for FusionBench alike
(bench/fusionbench_runner.py).
Weave runs use 20 lambdas (0.05:1.0:0.05), collaborative, with the streaming library and with a
naive version that materialises every candidate model, side by side in the same run.
--baseline-src runs each merge a second time with the mergeloom package of another checkout
(e.g. a git worktree of an earlier commit), right after ours, and compares the two merged
deltas key by key (largest relative Frobenius difference): before/after in the same run.
Results: bench/results/merge_bench.json (entries of the methods run replace earlier ones, each
with its command and date) and the table between the markers in BENCHMARKS.md, unless
--no-markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
LAMBDAS = [round(0.05 * i, 2) for i in range(1, 21)]
FUSIONBENCH_PYTHON = ROOT / ".bench" / "fusionbench-venv" / "bin" / "python"
FUSIONBENCH_METHODS = ["weight_averaging", "task_arithmetic", "ties", "dare", "magmax", "tsv_m",
                       "iso_c", "iso_cts"]  # fmt: skip
WEAVE_METHODS = ["task_arithmetic", "ties"]
NAIVE = {"task_arithmetic/mean", "task_arithmetic/random", "task_arithmetic/max_abs"}
POOLS = ["mean", "random", "max_abs"]
MARK_START, MARK_END = "<!-- merge_bench:start -->", "<!-- merge_bench:end -->"


# ---------------------------------------------------------------- child side (one measurement)


def child(
    kind: str, method: str, pool: str, experts_dir: Path, out: Path, src: Path | None
) -> None:
    if src is not None:  # another checkout's mergeloom (--baseline-src)
        sys.path.insert(0, str(src))
    start = time.perf_counter()
    from mergeloom import device, methods, vectors, weave  # noqa: F401  (timed as import_s)

    import_s = time.perf_counter() - start
    # the stages' runtime setting: --device in the parent sets it for every child
    with device.compute_on(os.environ.get("MERGELOOM_DEVICE", "cpu")) as used:
        name = torch_device_name(used)
        start = time.perf_counter()
        wall_s = merge_and_save(kind, method, pool, experts_dir, out)
    print(json.dumps({"wall_s": wall_s, "import_s": import_s, "device": name}))


def torch_device_name(used) -> str:
    import torch

    return torch.cuda.get_device_name(used) if used.type == "cuda" else str(used)


def merge_and_save(kind: str, method: str, pool: str, experts_dir: Path, out: Path) -> float:
    """Load + merge (or weave) + save, timed; the output is always written from the CPU."""
    from mergeloom import methods, vectors, weave

    start = time.perf_counter()
    experts = sorted(experts_dir.glob("expert_*.safetensors"))
    pretrained = experts_dir / "pretrained.safetensors"
    if kind == "naive-weave":
        delta = naive_weave(method, pool, pretrained, experts)
    else:
        task_vectors = vectors.load_task_vectors(pretrained, experts)
        if kind == "merge":
            delta = methods.get(method)(task_vectors)
        else:
            delta = weave.weave(method, task_vectors, {"lam": LAMBDAS}, pool)
    merged = vectors.apply(vectors.SafetensorsFile(pretrained), delta, inplace=True)
    vectors.save(merged, out)
    return time.perf_counter() - start


def naive_weave(method: str, pool: str, pretrained: Path, experts: list[Path]) -> dict:
    """What a direct implementation does: every task vector and candidate model in memory."""
    from mergeloom import methods, vectors, weave

    base = vectors.load(pretrained)
    task_vectors = [vectors.subtract(vectors.load(p), base) for p in experts]
    candidates = [methods.get(method)(task_vectors, lam=lam) for lam in LAMBDAS]
    pool_set = task_vectors + candidates
    return weave.get_pool(pool, n_candidates=len(pool_set))(pool_set)


# ---------------------------------------------------------------- parent side


def warm_page_cache(experts: Path) -> None:
    """Read every input file once, so each measured run starts from the page cache whatever the
    run before it (or another process) evicted: the tools are compared on compute, not on disk."""
    buffer = bytearray(64 * 2**20)
    for path in sorted(experts.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def measure(cmd: list[str], rss_limit: float) -> dict:
    """Run one command; peak RSS from wait4, plus a watchdog that kills it above the limit."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        polled, killed, done = [0.0], [False], threading.Event()

        def watch() -> None:
            handle = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    rss = handle.memory_info().rss / 2**30
                except psutil.Error:
                    return
                polled[0] = max(polled[0], rss)
                if rss > rss_limit:
                    killed[0] = True
                    handle.kill()
                    return
                time.sleep(0.1)

        threading.Thread(target=watch, daemon=True).start()
        start = time.perf_counter()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child only
        done.set()
        process_s = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
        errors = err.read().strip().splitlines()
        named = [ln.strip(" │") for ln in errors if "Error" in ln]  # a traceback's last error
        error_tail = (named or errors)[-1:] or [""]
    peak = max(polled[0], usage.ru_maxrss / 2**20)  # ru_maxrss is in KiB on Linux
    cpu_s = usage.ru_utime + usage.ru_stime  # whole process, both cores: less disturbed by load
    result = {"process_s": round(process_s, 2), "process_cpu_s": round(cpu_s, 2),
              "peak_rss_gb": round(peak, 2)}  # fmt: skip
    if killed[0]:
        return {**result, "status": f"killed at {peak:.1f} GB (limit {rss_limit:g} GB)"}
    if os.waitstatus_to_exitcode(status) != 0 or not lines:
        code = os.waitstatus_to_exitcode(status)
        return {**result, "status": f"failed (exit {code}): {error_tail[0][:200]}"}
    reported = json.loads(lines[-1])
    timings = {k: round(v, 2) for k, v in reported.items() if isinstance(v, float)}
    where = {"device": reported["device"]} if "device" in reported else {}
    return {**result, **timings, **where, "status": "ok"}


def ours(
    kind: str,
    method: str,
    pool: str,
    experts: Path,
    work: Path,
    limit: float,
    src: Path | None = None,
    keep: bool = False,
) -> dict:
    """One measurement of this checkout's mergeloom (or ``src``'s); ``keep`` keeps the output
    (its path is returned as "out")."""
    tag = "baseline" if src else "ours"
    out = work / f"out_{tag}_{kind}_{method}_{pool}.safetensors"
    cmd = [sys.executable, __file__, "--child", kind, method, pool, "--experts-dir", str(experts),
           "--child-out", str(out)] + (["--child-src", str(src)] if src else [])  # fmt: skip
    warm_page_cache(experts)
    result = measure(cmd, limit)
    if keep and result["status"] == "ok":
        return {**result, "out": str(out)}
    out.unlink(missing_ok=True)
    return result


def largest_difference(a: Path, b: Path, pretrained: Path) -> float:
    """max over keys of |delta_a - delta_b| / |delta_b| (Frobenius), delta = merged - pretrained."""
    from mergeloom.vectors import SafetensorsFile

    base, left, right = SafetensorsFile(pretrained), SafetensorsFile(a), SafetensorsFile(b)
    worst = 0.0
    for key in base:
        if not base[key].is_floating_point():
            continue
        p = base[key].double()
        reference = right[key].double() - p
        difference = (left[key].double() - p - reference).norm().item()
        scale = reference.norm().item()
        worst = max(worst, difference / scale if scale > 0 else difference)
    return worst


def fusionbench(method: str, experts: Path, work: Path, limit: float) -> dict:
    out = work / f"out_fusionbench_{method}.safetensors"
    files = sorted(str(p) for p in experts.glob("expert_*.safetensors"))
    cmd = [str(FUSIONBENCH_PYTHON), str(ROOT / "bench" / "fusionbench_runner.py"), "--method",
           method, "--pretrained", str(experts / "pretrained.safetensors"), "--experts", *files,
           "--out", str(out)]  # fmt: skip
    warm_page_cache(experts)
    result = measure(cmd, limit)
    out.unlink(missing_ok=True)
    return result


def seconds(result: dict) -> float:
    """Load + merge + save; the FusionBench runner reports its save time apart."""
    return result["wall_s"] + result.get("save_s", 0.0)


def fmt(result: dict | None) -> tuple[str, str]:
    if result is None:
        return "n/a", "n/a"
    if result["status"] != "ok":
        return result["status"], f"{result['peak_rss_gb']:.2f}"
    return f"{seconds(result):.1f}", f"{result['peak_rss_gb']:.2f}"


def markdown(results: dict, command: str) -> str:
    """The tables for BENCHMARKS.md; the before/after columns only when --baseline-src ran."""
    merge, fb = results["merge"], results.get("fusionbench", {})
    baseline = results.get("baseline", {})
    header = ("| method | mergeloom s | mergeloom peak RSS GB | FusionBench s | "
              "FusionBench peak RSS GB | time ours/FB |")  # fmt: skip
    if baseline:
        header += " before s | before GB | ours/before | max rel. diff to before |"
    lines = [
        f"Command: `{command}` ({results['when']}, {results['machine']}); "
        f"{results['params']:,} params per expert, {results['experts']} experts.",
        "",
        header,
        "|---" * header.count(" | ") + "|---|",
    ]
    for name, result in merge.items():
        ours_s, ours_gb = fmt(result)
        fb_s, fb_gb = fmt(fb.get(name))
        ok = result["status"] == "ok" and fb.get(name, {}).get("status") == "ok"
        ratio = f"{seconds(result) / seconds(fb[name]):.2f}" if ok else "n/a"
        row = f"| {name} | {ours_s} | {ours_gb} | {fb_s} | {fb_gb} | {ratio} |"
        if baseline:
            before = baseline.get(name)
            before_s, before_gb = fmt(before)
            ok = result["status"] == "ok" and (before or {}).get("status") == "ok"
            speedup = f"{seconds(result) / seconds(before):.2f}" if ok else "n/a"
            diff = f"{result['max_rel_diff']:.1e}" if "max_rel_diff" in result else "n/a"
            row += f" {before_s} | {before_gb} | {speedup} | {diff} |"
        lines.append(row)
    lines += [
        "",
        "Weave over 20 lambdas (collaborative), streaming vs naive (every candidate "
        "model in memory); ratio = weave time / one merge of the same method.",
        "",
        "| method | pool | weave s | weave GB | weave/merge | naive s | naive GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, result in results["weave"].items():
        name, pool = key.split("/")
        naive = results["naive_weave"].get(key)
        ws, wgb = fmt(result)
        ns, ngb = fmt(naive)
        base = merge.get(name)
        ok = result["status"] == "ok" and base and base["status"] == "ok"
        ratio = f"{seconds(result) / seconds(base):.2f}" if ok else "n/a"
        lines.append(f"| {name} | {pool} | {ws} | {wgb} | {ratio} | {ns} | {ngb} |")
    return "\n".join(lines)


def update_benchmarks_md(table: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{MARK_START}\n{MARK_END}\n"
    head, _, rest = text.partition(MARK_START)
    _, _, tail = rest.partition(MARK_END)
    path.write_text(f"{head}{MARK_START}\n{table}\n{MARK_END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=ROOT / ".bench" / "work")
    ap.add_argument("--experts-dir", type=Path, default=None)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--fusionbench", action="store_true", help="also run FusionBench")
    ap.add_argument("--no-weave", dest="weave", action="store_false")
    ap.add_argument("--rss-limit-gb", type=float, default=14.0)
    ap.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or auto: MERGELOOM_DEVICE for every mergeloom run, as in the stages "
        "(the device name is recorded per run; FusionBench's runner stays on the CPU)",
    )
    ap.add_argument("--render", action="store_true", help="only re-render the saved results")
    ap.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        help="also time each merge with the mergeloom package under this checkout "
        "(e.g. a git worktree of an earlier commit) and compare the outputs",
    )
    ap.add_argument(
        "--no-markdown",
        dest="markdown",
        action="store_false",
        help="write bench/results/merge_bench.json only, not BENCHMARKS.md",
    )
    ap.add_argument("--child", nargs=3, metavar=("KIND", "METHOD", "POOL"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-src", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    experts = args.experts_dir or args.work_dir / "experts"
    if args.child:
        return child(*args.child, experts, args.child_out, args.child_src)
    if args.device:
        os.environ["MERGELOOM_DEVICE"] = args.device  # read by every child
    saved = ROOT / "bench" / "results" / "merge_bench.json"
    if args.render:
        results = json.loads(saved.read_text())
        return update_benchmarks_md(markdown(results, results["command"]))

    from mergeloom import methods
    from mergeloom.vectors import SafetensorsFile

    args.work_dir.mkdir(parents=True, exist_ok=True)
    if not (experts / "expert_7.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_experts.py"), "--out-dir",
                        str(experts), "--num-experts", "8"], check=True)  # fmt: skip
    if args.fusionbench:
        subprocess.run(["bash", str(ROOT / "bench" / "setup_fusionbench.sh")], check=True)
    names = args.methods or list(methods.METHODS)
    results: dict = {"merge": {}, "fusionbench": {}, "baseline": {}, "weave": {}, "naive_weave": {}}
    for name in names:
        keep = args.baseline_src is not None
        result = ours("merge", name, "-", experts, args.work_dir, args.rss_limit_gb, keep=keep)
        results["merge"][name] = result
        if keep:
            before = ours("merge", name, "-", experts, args.work_dir, args.rss_limit_gb,
                          src=args.baseline_src, keep=True)  # fmt: skip
            results["baseline"][name] = before
            if "out" in result and "out" in before:
                result["max_rel_diff"] = largest_difference(
                    Path(result["out"]), Path(before["out"]), experts / "pretrained.safetensors"
                )
            for measured in (result, before):
                Path(measured.pop("out", "")).unlink(missing_ok=True)
            print("  baseline", before, flush=True)
        print(name, results["merge"][name], flush=True)
        if args.fusionbench and name in FUSIONBENCH_METHODS:
            fb = fusionbench(name, experts, args.work_dir, args.rss_limit_gb)
            results["fusionbench"][name] = fb
            print("  fusionbench", fb, flush=True)
    for name in [n for n in WEAVE_METHODS if n in names] if args.weave else []:
        for pool in POOLS:
            key = f"{name}/{pool}"
            results["weave"][key] = ours("weave", name, pool, experts, args.work_dir,
                                         args.rss_limit_gb)  # fmt: skip
            if key in NAIVE:  # 20 explicit merges: only where that is affordable
                results["naive_weave"][key] = ours("naive-weave", name, pool, experts,
                                                   args.work_dir, args.rss_limit_gb)  # fmt: skip
            print(key, results["weave"][key], results["naive_weave"].get(key), flush=True)
    pretrained = SafetensorsFile(experts / "pretrained.safetensors")
    memory_gib = psutil.virtual_memory().total / 2**30
    results.update(
        params=sum(math.prod(pretrained.shape(k)) for k in pretrained),
        experts=8,
        when=time.strftime("%Y-%m-%d"),
        machine=f"{psutil.cpu_count()} CPUs, {memory_gib:.0f} GiB",
    )
    results["command"] = ("python bench/merge_bench.py " + " ".join(sys.argv[1:])).strip()
    results = merged_with_saved(results, saved)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.markdown:
        update_benchmarks_md(markdown(results, results["command"]))


def merged_with_saved(results: dict, saved: Path) -> dict:
    """This run's entries, stamped with its command and date, over the saved ones: rerunning
    some methods keeps the measurements of the others."""
    for table in ("merge", "fusionbench", "baseline", "weave", "naive_weave"):
        for entry in results[table].values():
            entry.update(command=results["command"], when=results["when"])
    if not saved.exists():
        return results
    previous = json.loads(saved.read_text())
    for table in ("merge", "fusionbench", "baseline", "weave", "naive_weave"):
        results[table] = {**previous.get(table, {}), **results[table]}
    return results


if __name__ == "__main__":
    main()
