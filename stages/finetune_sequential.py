"""Sequential fine-tuning: split t starts from the expert of split t-1 (split 0 from theta_0).

    python -m stages.finetune_sequential --data-dir data/continual \
        --heads-dir models/heads/continual \
        --pretrained models/pretrained.safetensors --out-dir models/experts/continual_sequential \
        --logs-dir logs/finetune/continual_sequential

One stage for the whole chain: a DVC foreach item cannot refer to the previous item, and any
change early in the chain retrains everything after it anyway. Each expert is still its own
file, and its task vector is taken against theta_0 (cumulative, as MagMax does).
"""

import argparse
from pathlib import Path

from mergeloom import vectors
from stages import common
from stages.finetune import train_expert


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--data-dir", "--heads-dir", "--pretrained", "--out-dir", "--logs-dir"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args(argv)
    p = common.load_params("model", "setups", "finetune")
    model, _ = common.load_model(p, args.pretrained)
    for split in common.continual_splits(p["setups"]["continual"]):
        state = train_expert(p, args.data_dir / f"{split}.safetensors",
                             args.heads_dir / f"{split}.safetensors", model,
                             args.logs_dir / split)  # fmt: skip
        vectors.save(state, args.out_dir / f"{split}.safetensors",
                     metadata={"task": split, "init": "previous split"})  # fmt: skip


if __name__ == "__main__":
    common.run(main)
