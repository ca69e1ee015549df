"""Fine-tune the image tower on one task through its frozen zero-shot head: one expert.

    python -m stages.finetune --data data/multitask/digits.safetensors \
        --head models/heads/multitask/digits.safetensors \
        --pretrained models/pretrained.safetensors \
        [--init models/experts/continual_sequential/split0.safetensors] \
        --out models/experts/multitask/digits.safetensors --logs logs/finetune/multitask/digits

Without --init the expert starts from the pretrained weights (individual fine-tuning); with it,
from the previous expert of a sequential chain.
"""

import argparse
from pathlib import Path

from dvclive import Live

from mergeloom import clip, train, vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--data", "--head", "--pretrained", "--out", "--logs"):
        parser.add_argument(name, type=Path, required=True)
    parser.add_argument("--init", type=Path, default=None)
    args = parser.parse_args(argv)
    p = common.load_params("model", "finetune")
    cfg, device = p["finetune"], clip.pick_device(p["model"]["device"])
    task = common.load_task(args.data)
    model, _ = clip.load_clip(p["model"]["name"])
    clip.load_full_state(model, vectors.load(args.pretrained))
    if args.init is not None:
        clip.load_image_encoder(model, vectors.load(args.init))
    head = vectors.load(args.head)["head"]
    with Live(str(args.logs), dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def log(step: int, values: dict) -> None:
            live.step = step
            for key, value in values.items():
                live.log_metric(f"finetune/{key}", float(value))

        state = train.finetune(model, head, task.train.images, task.train.labels, log=log,
                               device=device, **cfg)  # fmt: skip
        live.summary["task"] = task.name
        live.summary["init"] = str(args.init or "pretrained")
    vectors.save(state, args.out, metadata={"task": task.name, "init": str(args.init or "")})


if __name__ == "__main__":
    main()
