"""The embedded data: scikit-learn's digits as the tasks of every digits setup, recorded splits.

    python -m stages.data --out data

Writes `<out>/splits.json`, `<out>/<setup>/<task>.safetensors` for each setup whose dataset is
`digits` (continual: only `all`, the 10-way task; its class splits are cut from it), and
`<out>/pretrain.safetensors` (captioned train images) when the pretrain stage trains the model.
"""

import argparse
import dataclasses
from pathlib import Path

import torch

from mergeloom import data, setups, tasks, vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = common.parse_args(parser, argv)
    p = common.load_params("model", "data", "setups")
    d = p["data"]
    splits = data.digit_splits(val_fraction=d["val_fraction"], test_fraction=d["test_fraction"],
                               seed=d["seed"])  # fmt: skip
    common.write_json(args.out / "splits.json", splits)
    shared = {"image_size": d["image_size"], "splits": splits}
    written = 0
    for setup, cfg in p["setups"].items():
        if cfg["dataset"] != "digits":
            continue
        if setup == "multitask":
            built = data.multitask_tasks(cfg["tasks"], seed=d["seed"], **shared)
        elif setup == "continual":
            built = [dataclasses.replace(data.full_test(**shared), name=setups.ALL)]
        else:
            built = data.domain_tasks(cfg["domains"], seed=d["seed"], **shared)
        for task in built:
            tasks.save_task(task, args.out / setup / f"{task.name}.safetensors")
            written += 1
    if p["model"]["pretrained"] is None:
        images, captions = data.pretraining_pairs(seed=d["seed"], **shared)
        vectors.save({"images": images, "index": torch.arange(len(captions))},
                     args.out / "pretrain.safetensors",
                     metadata=vectors.metadata_json({"captions": captions}))  # fmt: skip
    common.log.info("wrote %d digit tasks to %s", written, args.out)


if __name__ == "__main__":
    common.run(main)
