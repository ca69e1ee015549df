"""Every merge method at its data-free default, for each problem of a setup, scored.

    python -m stages.merge --setup multitask --pretrained models/pretrained.safetensors \
        --pretrained-visual models/pretrained_visual.safetensors --data ... --heads ... \
        --task-vectors models/task_vectors/multitask/digits.safetensors ... \
        --out-dir models/merged/multitask --metrics metrics/multitask/merge.json
"""

import argparse
from pathlib import Path

from mergeloom import methods, protocol, vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_setup_args(parser)
    parser.add_argument("--pretrained-visual", type=Path, required=True)
    parser.add_argument("--task-vectors", type=Path, nargs="+", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    p = common.load_params("model", "setups", "merge", "evaluate")
    model, device, problems = common.load_setup(args, p)
    base = vectors.load(args.pretrained_visual)
    task_vectors = common.load_task_vectors(args.task_vectors)
    results: dict = {}
    for problem in problems:
        members = [task_vectors[name] for name in problem.members]
        for name, hyperparameters in p["merge"]["methods"].items():
            visual = vectors.apply(base, methods.get(name)(members, **(hyperparameters or {})))
            vectors.save(
                visual,
                args.out_dir / problem.name / f"{name}.safetensors",
                metadata=vectors.metadata_json({"method": name, **(hyperparameters or {})}),
            )
            results.setdefault(problem.name, {})[name] = protocol.score(
                model, visual, problem.eval_sets, device=device,
                batch_size=p["evaluate"]["batch_size"])  # fmt: skip
    common.write_json(args.metrics, results)


if __name__ == "__main__":
    main()
