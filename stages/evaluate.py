"""Baselines of a setup: the zero-shot model and every individual expert on every eval set.

    python -m stages.evaluate --setup multitask --pretrained models/pretrained.safetensors \
        --pretrained-visual models/pretrained_visual.safetensors --data ... --heads ... \
        --experts models/experts/multitask/digits.safetensors ... \
        --out metrics/multitask/baselines.json
"""

import argparse
from pathlib import Path

from mergeloom import protocol, vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_setup_args(parser)
    parser.add_argument("--pretrained-visual", type=Path, required=True)
    parser.add_argument("--experts", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    p = common.load_params("model", "setups", "evaluate")
    model, device, problems = common.load_setup(args, p)
    sets = protocol.eval_sets_of(problems)

    def scored(path: Path) -> dict:
        return protocol.score(model, vectors.load(path), sets, device=device,
                              batch_size=p["evaluate"]["batch_size"])  # fmt: skip

    experts = {common.task_name(path): scored(path) for path in args.experts}
    common.write_json(args.out, {"zeroshot": scored(args.pretrained_visual), "experts": experts})


if __name__ == "__main__":
    main()
