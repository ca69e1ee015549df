"""Zero-shot classification heads from the pretrained text tower, one per task, frozen after.

python -m stages.heads --pretrained models/pretrained.safetensors --data data --out models/heads
"""

import argparse
from pathlib import Path

from mergeloom import clip, vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--pretrained", "--data", "--out"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args(argv)
    p = common.load_params("model", "setups")
    model, tokenizer = clip.load_clip(p["model"]["name"])
    clip.load_full_state(model, vectors.load(args.pretrained))
    setups = p["setups"]
    names = {
        "multitask": setups["multitask"]["tasks"],
        "continual": [*common.continual_splits(setups["continual"]), "all_digits"],
        "domains": setups["domains"]["domains"],
    }
    for setup, tasks in names.items():
        for name in tasks:
            task = common.load_task(args.data / setup / f"{name}.safetensors")
            head = clip.zeroshot_head(model, tokenizer, task.classnames, task.templates)
            vectors.save({"head": head.contiguous()}, args.out / setup / f"{name}.safetensors")


if __name__ == "__main__":
    common.run(main)
