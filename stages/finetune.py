"""Fine-tune the image tower on one task through its frozen zero-shot head: one expert.

    python -m stages.finetune --unit multitask --task digits \
        --init models/pretrained_visual.safetensors --pretrained models/pretrained.safetensors \
        --head models/heads/multitask/digits.safetensors --data-dir data \
        --out models/experts/multitask/digits.safetensors --logs logs/finetune/multitask/digits

`--init` is the image tower training starts from: theta_0 for individual fine-tuning, the
previous split's expert in the sequential chain. Resume checkpoints go to `.resume/<unit>/`,
outside every DVC output (DVC deletes a stage's outputs before it runs), and are removed when
the expert is saved; rerunning an interrupted stage continues where it stopped.
"""

import argparse
from pathlib import Path

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
    setup = units[args.unit].setup
    task = setups.load_tasks(
        setup,
        p["setups"][setup],
        p["data"],
        data_dir=args.data_dir,
        datasets_root=rt["datasets_root"],
        names=[args.task],
    )[args.task]
    model, _ = clip.load_clip(p["model"]["name"])
    clip.load_full_state(model, vectors.load(args.pretrained))
    clip.load_image_encoder(model, vectors.load(args.init))
    train_tf, _ = loops.transforms(model)
    ft = p["finetune"]
    hp = {k: ft[k] for k in ("batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip",
                             "accumulate", "seed", "checkpoint_every")}  # fmt: skip
    n_steps = steps(ft, args.task, len(task.train))
    with Live(str(args.logs), dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def log(step: int, values: dict) -> None:
            live.step = step
            for key, value in values.items():
                live.log_metric(f"finetune/{key}", float(value))

        state = train.finetune(
            model, vectors.load(args.head)["head"], task.train, transform=train_tf,
            steps=n_steps, device=pick_device(rt["device"]),
            num_workers=0 if setups.in_memory(task.train) else rt["num_workers"],
            checkpoint=Path(".resume") / args.unit / f"{args.task}.pt",
            num_classes=len(task.classnames), log=log, **hp,
        )  # fmt: skip
        live.summary |= {"task": args.task, "steps": n_steps}
    vectors.save(state, args.out, metadata={"task": args.task, "init": str(args.init),
                                            "steps": str(n_steps)})  # fmt: skip
    common.log.info("fine-tuned %s/%s for %d steps from %s; wrote %s", args.unit, args.task,
                    n_steps, args.init, args.out)  # fmt: skip


if __name__ == "__main__":
    common.run(main)
