"""Merge and weave stages: peak RSS and wall time of the real stage processes on 8 experts.

    .venv/bin/python bench/stage_memory.py [--work-dir DIR] [--methods ties] \
        [--out bench/results/stage_memory.json]

Builds a throwaway pipeline folder (default .bench/stage_memory, git-ignored) laid out as the
stages expect when run from it: params.yaml (presets/vit-b-32-8tasks schema, 8 multitask tasks
read from tiny real dataset files), models/pretrained.safetensors (a seeded random-init full
CLIP), models/heads (seeded random float32 (embed_dim, C) heads, not zero-shot ones: accuracy is
not measured here) and models/task_vectors (synthetic image-tower task vectors, 0.01 * seeded
randn per float key, written one at a time). Then runs `python -m stages.merge METHOD ...` and
`python -m stages.weave METHOD ...` with the command lines of dvc.yaml, cwd = that folder, and
records each process's wall time and peak RSS (psutil polling of the process tree, as
bench/merge_bench.py does, and the kernel's ru_maxrss from wait4). Prints a markdown table and
writes JSON. The folder is reused when it was built with the same settings (--rebuild forces).

MNIST's test split has --eval-images images (default 512, two batches at the default
MERGELOOM_EVAL_BATCH_SIZE of 256), so full evaluation batches (their images, collation and
activations) are part of the peak; every other set has a few images per class.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["MNIST", "FashionMNIST", "KMNIST", "EMNIST", "RESISC45", "EuroSAT", "CIFAR10",
         "CIFAR100"]  # fmt: skip
SITECUSTOMIZE = """\
import torchvision.datasets as tvd
for cls in (tvd.CIFAR10, tvd.CIFAR100):
    cls.train_list = [[name, None] for name, _ in cls.train_list]
    cls.test_list = [[name, None] for name, _ in cls.test_list]
    cls.meta = {**cls.meta, "md5": None}
"""  # as tests/test_preset_dvc.py: torchvision checks CIFAR md5 sums, these files are fake
MODEL_ARGS = ["--pretrained", "models/pretrained.safetensors", "--pretrained-visual",
              "models/pretrained_visual.safetensors", "--heads-dir", "models/heads",
              "--data-dir", "data", "--task-vectors-dir", "models/task_vectors"]  # fmt: skip
NOISE_STD = 0.01
# the floor every stage process starts from: its imports (torch's shared libraries are most of it)
IMPORTS = "import stages.merge, stages.weave, mergeloom.clip, mergeloom.evaluate"


# ---------------------------------------------------------------- the pipeline folder


def write_datasets(root: Path, tasks: list[str], eval_images: int) -> None:
    """Tiny files in each task's real on-disk layout (mergeloom.datasets.SOURCES)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_data import write_cifar, write_image_folder, write_mnist

    for seed, task in enumerate(tasks):
        if task in ("MNIST", "FashionMNIST", "KMNIST", "EMNIST"):
            write_mnist(root, task, n_train=40, n_test=eval_images if task == "MNIST" else 20,
                        seed=seed)  # fmt: skip
        elif task == "RESISC45":
            classes = ["airport", "baseball_diamond", "beach", "bridge"]
            write_image_folder(root / "resisc45" / "NWPU-RESISC45", classes, 8, seed=seed)
        elif task == "EuroSAT":
            classes = ["Forest", "Highway", "River", "SeaLake"]
            write_image_folder(root / "eurosat" / "2750", classes, 8, seed=seed, ext="jpg")
        elif task in ("CIFAR10", "CIFAR100"):
            classes = 10 if task == "CIFAR10" else 100
            write_cifar(root, classes, n_train=2 * classes, n_test=classes // 2, seed=seed)
        else:
            raise ValueError(f"no fake dataset writer for {task}")


def params(model: str, pretrained: Path, tasks: list[str], methods: list[str]) -> dict:
    import yaml

    p = yaml.safe_load((ROOT / "presets" / "vit-b-32-8tasks" / "params.yaml").read_text())
    p["model"] = {"name": model, "pretrained": str(pretrained)}
    p["setups"] = {"multitask": {"dataset": "benchmarks", "tasks": tasks}}
    p["finetune"]["epochs"] = {t: 1 for t in tasks}
    p["sweep"] = {"lambdas": [0.3, 1.0]}
    p["merge"]["methods"] = {m: p["merge"]["methods"][m] for m in methods}
    p["weave"] |= {"methods": methods, "pools": ["mean", "random"],
                   "lambdas": [0.2, 0.4, 0.6, 0.8, 1.0]}  # fmt: skip
    return p


def build(work: Path, settings: dict) -> None:
    """Write params.yaml, the full CLIP, heads, task vectors, datasets and sitecustomize.py."""
    import torch
    import yaml

    from mergeloom import clip, datasets, vectors

    tasks, model_name = settings["tasks"], settings["model"]
    write_datasets(work / "datasets", tasks, settings["eval_images"])
    (work / "site").mkdir()
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    torch.manual_seed(0)
    model, _ = clip.load_clip(model_name)  # random init, no download
    pretrained = work / "models" / "pretrained.safetensors"
    vectors.save(clip.full_state(model), pretrained)
    p = params(model_name, pretrained, tasks, settings["methods"])
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    split = {k: p["data"][k] for k in ("val_fraction", "val_max", "seed")}
    embed_dim = model.visual.output_dim
    with _cifar_checks_off():
        for i, task in enumerate(tasks):
            n_classes = len(datasets.load_task(task, work / "datasets", **split).classnames)
            gen = torch.Generator().manual_seed(1000 + i)
            head = torch.randn(embed_dim, n_classes, generator=gen)
            vectors.save({"head": head}, work / "models" / "heads" / "multitask" /
                         f"{task}.safetensors")  # fmt: skip
    visual = clip.image_encoder_state(model)
    vectors.save(visual, work / "models" / "pretrained_visual.safetensors")
    del model
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(i + 1)
        tv = {k: NOISE_STD * torch.randn(v.shape, generator=gen) for k, v in visual.items()}
        vectors.save(tv, work / "models" / "task_vectors" / "multitask" / f"{task}.safetensors")
        del tv
    (work / "build.json").write_text(json.dumps(settings, indent=1) + "\n")


class _cifar_checks_off:
    """SITECUSTOMIZE for this process, undone on exit."""

    def __enter__(self) -> None:
        import torchvision.datasets as tvd

        self.saved = [(c, c.train_list, c.test_list, c.meta) for c in (tvd.CIFAR10, tvd.CIFAR100)]
        exec(SITECUSTOMIZE, {})

    def __exit__(self, *exc) -> None:
        for cls, train, test, meta in self.saved:
            cls.train_list, cls.test_list, cls.meta = train, test, meta


def prepare(work: Path, settings: dict, rebuild: bool) -> None:
    stamp = work / "build.json"
    if not rebuild and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        print(f"reusing {work}", file=sys.stderr)
        return
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    start = time.perf_counter()
    # In a child process: this one must stay small, since a child's ru_maxrss starts from the
    # RSS of the process that forked it (Linux carries the parent's high-water mark over fork
    # and exec), so a parent holding torch and a model would inflate every measurement.
    cmd = [sys.executable, __file__, "--build", str(work), json.dumps(settings)]
    subprocess.run(cmd, check=True)
    print(f"built {work} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


# ---------------------------------------------------------------- measuring one stage process


def measure(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run a stage; wall time, peak RSS (polled over its process tree every 0.1 s, and
    ru_maxrss of the stage process from wait4), exit status. Output goes to ``log``."""
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        polled, done = [0.0, 0.0], threading.Event()

        def watch() -> None:
            handle = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    info = [p.memory_info() for p in [handle, *handle.children(recursive=True)]]
                except psutil.Error:
                    return
                polled[0] = max(polled[0], sum(i.rss for i in info) / 2**30)
                polled[1] = max(polled[1], sum(i.rss - i.shared for i in info) / 2**30)
                time.sleep(0.1)

        threading.Thread(target=watch, daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
    code = os.waitstatus_to_exitcode(status)
    result = {"wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
              "polled_peak_rss_gb": round(polled[0], 3),
              "polled_peak_anon_gb": round(polled[1], 3),  # RSS less file-backed pages
              "status": "ok" if code == 0 else f"failed (exit {code}), see {log}"}  # fmt: skip
    return result


def stage_commands(method: str) -> dict[str, list[str]]:
    """The dvc.yaml command lines (stages/pipeline.py) of the merge and weave stages."""
    py = [sys.executable, "-m"]
    return {
        "imports": [sys.executable, "-c", IMPORTS],
        "merge": [*py, "stages.merge", method, *MODEL_ARGS, "--out", f"metrics/merge/{method}.json",
                  "--plot", f"plots/sweep/{method}.csv"],
        "weave": [*py, "stages.weave", method, *MODEL_ARGS, "--out",
                  f"metrics/weave/{method}.json"],
    }  # fmt: skip


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, CPU only"


def markdown(report: dict, limit: float) -> str:
    unit = report["task_vector_gb"]
    lines = [f"| process | peak RSS (GB) | in task vectors | <= {limit:g} GB | anon. peak (GB) "
             "| wall (s) |", "|---|---:|---:|:---:|---:|---:|"]  # fmt: skip
    for name, r in report["stages"].items():
        peak = max(r["peak_rss_gb"], r["polled_peak_rss_gb"])
        ok = "yes" if peak <= limit else "**no**"
        if r["status"] != "ok":
            ok = r["status"]
        label = "imports only" if name == "imports" else f"`{name}`"
        lines.append(f"| {label} | {peak:.2f} | {peak / unit:.1f} | {ok} | "
                     f"{r['polled_peak_anon_gb']:.2f} | {r['wall_s']:.1f} |")  # fmt: skip
    lines.append(f"\nOne task vector file: {unit:.3f} GB ({report['model']} image tower, "
                 f"float32); full CLIP file: {report['pretrained_gb']:.3f} GB.")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--build"]:
        build(Path(sys.argv[2]), json.loads(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=ROOT / ".bench" / "stage_memory")
    ap.add_argument("--methods", nargs="+", default=["ties"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stage_memory.json")
    ap.add_argument(
        "--model",
        default="ViT-B-32",
        help="open_clip name or config JSON (configs/tiny-vit.json to try it out)",
    )
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--eval-images", type=int, default=512, help="MNIST test images")
    ap.add_argument("--limit-gb", type=float, default=3.0)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    model = str(Path(args.model).resolve()) if args.model.endswith(".json") else args.model
    work = args.work_dir.resolve()
    settings = {"model": model, "tasks": list(args.tasks), "methods": list(args.methods),
                "eval_images": args.eval_images}  # fmt: skip
    prepare(work, settings, args.rebuild)

    path = [str(work / "site"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "MERGELOOM_DEVICE": "cpu", "MERGELOOM_NUM_WORKERS": "0",
           "MERGELOOM_DATASETS": str(work / "datasets"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(path)}  # fmt: skip
    env.pop("MERGELOOM_EVAL_BATCH_SIZE", None)  # the default (512), as in a plain `dvc repro`
    (work / "logs").mkdir(exist_ok=True)
    tv_dir = work / "models" / "task_vectors" / "multitask"
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "model": Path(model).stem if model.endswith(".json") else model,
        "tasks": list(args.tasks),
        "eval_images_mnist_test": args.eval_images,
        "task_vector_gb": round(
            (tv_dir / f"{args.tasks[0]}.safetensors").stat().st_size / 2**30, 4
        ),
        "pretrained_gb": round(
            (work / "models" / "pretrained.safetensors").stat().st_size / 2**30, 4
        ),  # fmt: skip
        "stages": {},
    }
    for method in args.methods:
        for kind, cmd in stage_commands(method).items():
            name = kind if kind == "imports" else f"{kind} {method}"
            if name in report["stages"]:
                continue
            print(f"running {name} ...", file=sys.stderr, flush=True)
            log = work / "logs" / f"{name.replace(' ', '_')}.log"
            result = measure(cmd, work, env, log)
            result["command"] = " ".join(
                ["python", *cmd[1:2], repr(cmd[2]), *cmd[3:]]
                if kind == "imports"
                else ["python", *cmd[1:]]
            )
            report["stages"][name] = result
            print(f"  {result}", file=sys.stderr, flush=True)
    report["driver_rss_gb"] = round(psutil.Process().memory_info().rss / 2**30, 3)
    report["units"] = "every *_gb is GiB (2**30 bytes), as in bench/merge_bench.py"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report, args.limit_gb))
    failed = [n for n, r in report["stages"].items() if r["status"] != "ok"]
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
