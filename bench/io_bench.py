"""safetensors I/O benchmark: mergeloom.vectors against the safetensors library, side by side.

    .venv/bin/python bench/io_bench.py [--experts-dir DIR] [--repeats 3]

Three operations on the 8 ViT-B-32-shaped experts of bench/make_experts.py (351 MB each, in the
page cache: a warm-up pass reads every file first), each timed in its own process with its peak
RSS (bench/merge_bench.py's ``measure``), ours and the library's alternating, ``--repeats`` times:

* read: every key of every expert, key by key as a merge reads them, as fresh tensors: ours
  (``SafetensorsFile[key]``) against ``safe_open(..., backend="pread").get_tensor`` and, for
  reference, the default memory map (``backend="mmap"``), whose touched pages stay in the RSS;
* read_into: the same reads into one reused float32 buffer, as merges stack keys: ours
  (``SafetensorsFile.read_into``) against ``out.copy_(get_tensor(key))``;
* write: each expert, already in memory, saved: ours (``vectors.save``, streamed) against
  ``safetensors.torch.save_file``.

Every variant checks each tensor for NaN/Inf once (``vectors.check_finite``), as ours must.
Results: bench/results/io_bench.json (nothing is written to BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from merge_bench import ROOT, measure

VARIANTS = {"read": ["ours", "library", "library-mmap"], "read_into": ["ours", "library"],
            "write": ["ours", "library"]}  # fmt: skip


def child(operation: str, variant: str, experts_dir: Path, out_dir: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mergeloom import vectors

    paths = sorted(experts_dir.glob("expert_*.safetensors"))
    ours = [vectors.SafetensorsFile(p) for p in paths]
    keys = list(ours[0])
    if operation == "write":
        seconds = 0.0
        for i, source in enumerate(ours):
            state = {k: source[k].clone() for k in keys}  # in memory, as a merge result is
            target = out_dir / f"{variant}_{i}.safetensors"
            start = time.perf_counter()
            if variant == "ours":
                vectors.save(state, target)
            else:
                for key, tensor in state.items():
                    vectors.check_finite(tensor, key, str(target))
                save_file(state, target)
            seconds += time.perf_counter() - start
            target.unlink()
            del state
        print(json.dumps({"wall_s": seconds}))
        return
    start = time.perf_counter()
    backend = "mmap" if variant == "library-mmap" else "pread"
    handles = [safe_open(p, framework="pt", backend=backend) for p in paths]
    buffer = torch.empty(max(math.prod(ours[0].shape(k)) for k in keys))
    for key in keys:
        shape = ours[0].shape(key)
        for source, handle in zip(ours, handles, strict=True):
            if variant == "ours":
                if operation == "read":
                    tensor = source[key]
                else:
                    source.read_into(key, buffer[: math.prod(shape)].view(shape))
            else:
                tensor = handle.get_tensor(key)
                if operation == "read_into":
                    tensor = buffer[: math.prod(shape)].view(shape).copy_(tensor)
                vectors.check_finite(tensor, key, str(source.path))
    print(json.dumps({"wall_s": time.perf_counter() - start}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts-dir", type=Path, default=Path("/tmp/mlbench/experts"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("OPERATION", "VARIANT"), default=None)
    ap.add_argument("--out-dir", type=Path, default=None, help="where write puts its files")
    args = ap.parse_args()
    out_dir = args.out_dir or args.experts_dir.parent / "io_bench_out"
    if args.child:
        return child(*args.child, args.experts_dir, out_dir)
    if not (args.experts_dir / "pretrained.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_experts.py"), "--out-dir",
                        str(args.experts_dir)], check=True)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.experts_dir.glob("expert_*.safetensors")):  # into the page cache
        path.read_bytes()
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for operation, variants in VARIANTS.items():
            for variant in variants:
                cmd = [sys.executable, __file__, "--child", operation, variant, "--experts-dir",
                       str(args.experts_dir), "--out-dir", str(out_dir)]  # fmt: skip
                result = measure(cmd, rss_limit=8.0)
                runs.setdefault(f"{operation}/{variant}", []).append(result)
                print(operation, variant, result, flush=True)
    results = {name: summary(rs) for name, rs in runs.items()}
    out = ROOT / "bench" / "results" / "io_bench.json"
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(markdown(results, f"python bench/io_bench.py --repeats {args.repeats}"))


def summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return {"status": runs[-1]["status"]}
    walls = [r["wall_s"] for r in ok]
    status = "ok" if len(ok) == len(runs) else f"{len(runs) - len(ok)} failed"
    return {"wall_s_median": round(statistics.median(walls), 2), "wall_s_min": min(walls),
            "wall_s_all": walls, "peak_rss_gb": max(r["peak_rss_gb"] for r in ok),
            "status": status}  # fmt: skip


def markdown(results: dict, command: str) -> str:
    lines = [f"Command: `{command}` (8 ViT-B-32-shaped experts, 351 MB each, page cache warm; "
             "one process per run, ours and the library's alternating).", "",
             "| operation | variant | median (s) | min (s) | peak RSS (GB) | status |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        operation, _, variant = name.partition("/")
        cells = [r.get(k, "-") for k in ("wall_s_median", "wall_s_min", "peak_rss_gb", "status")]
        lines.append(f"| {operation} | {variant} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
