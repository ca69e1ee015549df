"""Fine-tune the image tower on one task through its frozen zero-shot head: one expert.

    python -m stages.finetune --unit multitask --task digits \
        --init models/pretrained_visual.safetensors --pretrained models/pretrained.safetensors \
        --head models/heads/multitask/digits.safetensors --data-dir data \
        --out models/experts/multitask/digits.safetensors --logs logs/finetune/multitask/digits

`--init` is the image tower training starts from: theta_0 for individual fine-tuning, the
previous split's expert in the sequential chain. Resume checkpoints go to `.resume/<unit>/`,
outside every DVC output (DVC deletes a stage's outputs before it runs), and are removed when
the expert is saved; rerunning an interrupted stage continues where it stopped.

With MERGELOOM_NPROC_PER_NODE=N > 1 (a runtime setting, not a param) the stage runs itself again
as N workers of `python -m torch.distributed.run --standalone --nproc-per-node N -m
stages.finetune <same arguments>` and exits with its status. The workers split every global batch
(DDP over NCCL on GPUs, gloo on the CPU; `train.finetune` sums their gradients), so the expert is
the single-process one up to floating-point reduction order; rank 0 alone writes the expert, the
dvclive logs and the resume checkpoints.
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
from dvclive import Live

from mergeloom import clip, loops, setups, train, vectors
from mergeloom.device import pick_device
from stages import common


def steps(finetune: dict, task: str, n_images: int) -> int:
    """Optimizer steps of one expert: `steps`, or `epochs` (one number or per task)."""
    if "steps" in finetune:
        return finetune["steps"]
    epochs = finetune["epochs"]
    if isinstance(epochs, dict):
        if task not in epochs:
            raise ValueError(f"params.yaml: finetune.epochs has no entry for task {task!r}")
        epochs = epochs[task]
    return train.steps_for(n_images, finetune["batch_size"], epochs)


def _relaunch(nproc: int, argv: list[str]) -> int:
    """Run this stage again as ``nproc`` torchrun workers on this machine; their exit status
    (a failing worker's, when one fails: torchrun then stops the others).

    torchrun is called in this process, its arguments parsed apart from the stage's: on its
    command line it would take the stage's ``--logs`` for an abbreviation of its ``--logs-specs``.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    ours = ["--standalone", f"--nproc-per-node={nproc}", "-m", "stages.finetune"]
    config = get_args_parser().parse_args(ours)
    config.training_script_args = argv
    common.log.info("fine-tuning in %d processes: torch.distributed.run %s %s", nproc,
                    " ".join(ours), " ".join(argv))  # fmt: skip
    try:
        run(config)
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        common.log.error("a fine-tuning process failed (exit status %s)", codes)
        return next((c for c in codes if c > 0), 1)
    return 0


def _join(device: torch.device) -> torch.device:
    """Join the process group torchrun set up; this worker's device (its own GPU on CUDA)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit", required=True)
    parser.add_argument("--task", required=True)
    for name in ("--init", "--pretrained", "--head", "--data-dir", "--out", "--logs"):
        parser.add_argument(name, type=Path, required=True)
    args = common.parse_args(parser, argv)
    p = common.load_params("model", "data", "setups", "finetune")
    rt = common.runtime()
    units = setups.units(p["setups"])
    if args.unit not in units or args.task not in units[args.unit].tasks:
        raise ValueError(f"--unit {args.unit} --task {args.task}: not an expert of params.yaml "
                         f"({ {u: list(x.tasks) for u, x in units.items()} })")  # fmt: skip
    nproc, ft = rt["nproc_per_node"], p["finetune"]
    if nproc > 1 and ft["batch_size"] % nproc:
        raise ValueError(f"finetune.batch_size {ft['batch_size']} must be divisible by "
                         f"MERGELOOM_NPROC_PER_NODE = {nproc}")  # fmt: skip
    if nproc > 1 and "LOCAL_RANK" not in os.environ:  # not yet a torchrun worker
        sys.exit(_relaunch(nproc, sys.argv[1:] if argv is None else list(argv)))
    setup = units[args.unit].setup
    task = setups.load_tasks(
        setup,
        p["setups"][setup],
        p["data"],
        data_dir=args.data_dir,
        datasets_root=rt["datasets_root"],
        names=[args.task],
    )[args.task]
    device = pick_device(rt["device"])
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        device = _join(device)
    rank = torch.distributed.get_rank() if distributed else 0
    model, _ = clip.load_clip(p["model"]["name"])
    clip.load_full_state(model, vectors.load(args.pretrained))
    clip.load_image_encoder(model, vectors.load(args.init))
    train_tf, _ = loops.transforms(model)
    hp = {k: ft[k] for k in ("batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip",
                             "accumulate", "seed", "checkpoint_every")}  # fmt: skip
    n_steps = steps(ft, args.task, len(task.train))
    logs = Live if rank == 0 else lambda *a, **k: contextlib.nullcontext()  # rank 0 logs
    with logs(str(args.logs), dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def log(step: int, values: dict) -> None:
            live.step = step
            for key, value in values.items():
                live.log_metric(f"finetune/{key}", float(value))

        state = train.finetune(
            model, vectors.load(args.head)["head"], task.train, transform=train_tf,
            steps=n_steps, device=device,
            num_workers=0 if setups.in_memory(task.train) else rt["num_workers"],
            checkpoint=Path(".resume") / args.unit / f"{args.task}.pt",
            num_classes=len(task.classnames), log=log if rank == 0 else None, **hp,
        )  # fmt: skip
        if rank == 0:
            live.summary |= {"task": args.task, "steps": n_steps}
    if rank == 0:
        vectors.save(state, args.out, metadata={"task": args.task, "init": str(args.init),
                                                "steps": str(n_steps)})  # fmt: skip
    if distributed:  # the others wait for rank 0's files; a failure anywhere fails torchrun
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank > 0:
        return
    common.log.info("fine-tuned %s/%s for %d steps from %s; wrote %s", args.unit, args.task,
                    n_steps, args.init, args.out)  # fmt: skip


if __name__ == "__main__":
    common.run(main)
