"""Task vectors tau_t = expert_t - theta_0 of every unit, always against theta_0 (cumulative
for the sequential chain, as MagMax does).

    python -m stages.task_vectors --pretrained-visual models/pretrained_visual.safetensors \
        --experts-dir models/experts --out-dir models/task_vectors
"""

import argparse
from pathlib import Path

from mergeloom import setups, vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--pretrained-visual", "--experts-dir", "--out-dir"):
        parser.add_argument(name, type=Path, required=True)
    args = common.parse_args(parser, argv)
    p = common.load_params("setups")
    written = 0
    for unit in setups.units(p["setups"]).values():
        experts = [args.experts_dir / unit.name / f"{t}.safetensors" for t in unit.tasks]
        missing = [str(e) for e in experts if not e.is_file()]
        if missing:
            raise ValueError(f"expert file(s) not found: {missing}; run `dvc repro`")
        for task, tv in zip(
            unit.tasks, vectors.load_task_vectors(args.pretrained_visual, experts), strict=True
        ):
            vectors.save({k: tv[k] for k in tv}, args.out_dir / unit.name / f"{task}.safetensors",
                         metadata={"unit": unit.name, "task": task})  # fmt: skip
        written += len(experts)
    common.log.info("wrote %d task vectors to %s", written, args.out_dir)


if __name__ == "__main__":
    common.run(main)
