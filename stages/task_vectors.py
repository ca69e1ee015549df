"""Task vectors tau_t = expert_t - pretrained of every unit, always against the pretrained tower.

    python -m stages.task_vectors --pretrained-visual models/pretrained_visual.safetensors \
        --experts-dir models/experts --out-dir models/task_vectors
"""

import argparse
from pathlib import Path

from mergeloom import vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--pretrained-visual", "--experts-dir", "--out-dir"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args(argv)
    common.check_pipeline()
    p = common.load_params("setups")
    for unit, (_, tasks) in common.units(p["setups"]).items():
        experts = [args.experts_dir / unit / f"{t}.safetensors" for t in tasks]
        for task, tv in zip(tasks, vectors.load_task_vectors(args.pretrained_visual, experts),
                            strict=True):  # fmt: skip
            vectors.save({k: tv[k] for k in tv}, args.out_dir / unit / f"{task}.safetensors",
                         metadata={"unit": unit, "task": task})  # fmt: skip


if __name__ == "__main__":
    common.run(main)
