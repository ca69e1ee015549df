"""Baselines of every unit: the zero-shot model and each individual expert on every eval set.

    python -m stages.evaluate --pretrained models/pretrained.safetensors \
        --pretrained-visual models/pretrained_visual.safetensors --data-dir data \
        --heads-dir models/heads --experts-dir models/experts --out-dir metrics
"""

import argparse
from pathlib import Path

from mergeloom import evaluate, protocol, vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--pretrained", "--pretrained-visual", "--data-dir", "--heads-dir",
                 "--experts-dir", "--out-dir"):  # fmt: skip
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args(argv)
    common.check_pipeline()
    p = common.load_params("model", "setups", "evaluate")
    model, device = common.load_model(p, args.pretrained)
    for unit, (setup, tasks) in common.units(p["setups"]).items():
        sets = protocol.eval_sets_of(common.problems(setup, tasks, p, args.data_dir,
                                                     args.heads_dir))  # fmt: skip

        def scored(visual: dict, sets: list = sets) -> dict:
            return evaluate.score(model, visual, sets, device=device,
                                  batch_size=p["evaluate"]["batch_size"])  # fmt: skip

        experts = common.load_dir(args.experts_dir / unit, tasks)
        common.write_json(args.out_dir / unit / "baselines.json", {
            "zeroshot": scored(vectors.load(args.pretrained_visual)),
            "experts": {name: scored(state) for name, state in experts.items()}})  # fmt: skip


if __name__ == "__main__":
    common.run(main)
