"""Build every task of the three setups from scikit-learn's digits, with recorded splits.

python -m stages.data --out data
"""

import argparse
from pathlib import Path

import torch

from mergeloom import data, vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    p = common.load_params("data", "setups")
    d, setups = p["data"], p["setups"]
    splits = data.digit_splits(val_fraction=d["val_fraction"], test_fraction=d["test_fraction"],
                               seed=d["seed"])  # fmt: skip
    common.write_json(args.out / "splits.json", splits)
    common_args = {"image_size": d["image_size"], "splits": splits}
    tasks = {
        "multitask": data.multitask_tasks(
            setups["multitask"]["tasks"], seed=d["seed"], **common_args
        ),  # fmt: skip
        "continual": [
            *data.continual_tasks(
                setups["continual"]["class_order"], setups["continual"]["n_tasks"], **common_args
            ),  # fmt: skip
            data.full_test(**common_args),
        ],
        "domains": data.domain_tasks(setups["domains"]["domains"], seed=d["seed"], **common_args),
    }
    for setup, items in tasks.items():
        for task in items:
            common.save_task(task, args.out / setup / f"{task.name}.safetensors")
    images, captions = data.pretraining_pairs(seed=d["seed"], **common_args)
    vectors.save({"images": images, "index": torch.arange(len(captions))},
                 args.out / "pretrain.safetensors",
                 metadata=vectors.metadata_json({"captions": captions}))  # fmt: skip
    common.log.info("wrote %d tasks and %d captioned images", sum(map(len, tasks.values())),
                    len(captions))  # fmt: skip


if __name__ == "__main__":
    common.run(main)
