"""Fine-tune the image tower on one task through its frozen zero-shot head: one expert.

    python -m stages.finetune --data data/multitask/digits.safetensors \
        --head models/heads/multitask/digits.safetensors \
        --pretrained models/pretrained.safetensors \
        --out models/experts/multitask/digits.safetensors --logs logs/finetune/multitask/digits

Individual fine-tuning: every expert starts from the pretrained weights.
(stages.finetune_sequential chains experts instead.)
"""

import argparse
from pathlib import Path

from dvclive import Live

from mergeloom import clip, train, vectors
from stages import common


def train_expert(p: dict, data: Path, head: Path, model, logs: Path) -> dict:
    """Train ``model``'s image tower in place on one task; returns the expert's state."""
    task = common.load_task(data)
    with Live(str(logs), dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def log(step: int, values: dict) -> None:
            live.step = step
            for key, value in values.items():
                live.log_metric(f"finetune/{key}", float(value))

        state = train.finetune(model, vectors.load(head)["head"], task.train.images,
                               task.train.labels, log=log,
                               device=clip.pick_device(p["model"]["device"]),
                               **p["finetune"])  # fmt: skip
        live.summary["task"] = task.name
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--data", "--head", "--pretrained", "--out", "--logs"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args(argv)
    p = common.load_params("model", "finetune")
    model, _ = common.load_model(p, args.pretrained)
    state = train_expert(p, args.data, args.head, model, args.logs)
    vectors.save(
        state, args.out, metadata={"task": common.task_name(args.data), "init": "pretrained"}
    )


if __name__ == "__main__":
    common.run(main)
