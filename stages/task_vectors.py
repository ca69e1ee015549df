"""Task vectors tau_t = expert_t - pretrained, always against the pretrained image tower.

    python -m stages.task_vectors --pretrained models/pretrained_visual.safetensors \
        --experts models/experts/multitask/digits.safetensors ... \
        --out-dir models/task_vectors/multitask
"""

import argparse
from pathlib import Path

from mergeloom import vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", type=Path, required=True)
    parser.add_argument("--experts", type=Path, nargs="+", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    for tv, path in zip(vectors.load_task_vectors(args.pretrained, args.experts), args.experts,
                        strict=True):  # fmt: skip
        name = common.task_name(path)
        vectors.save({k: tv[k] for k in tv}, args.out_dir / f"{name}.safetensors",
                     metadata={"task": name})  # fmt: skip


if __name__ == "__main__":
    main()
