"""Accuracy-vs-lambda of every method and the oracle lambda picked on the validation split.

    python -m stages.sweep --setup multitask ... --task-vectors ... \
        --metrics metrics/multitask/sweep.json --plots plots/multitask/sweep.csv

The oracle uses privileged data (validation labels of the evaluated tasks, or of the held-out
domain); it is an upper bound for data-free methods, never the test split.
"""

import argparse
import csv
from pathlib import Path

from mergeloom import protocol, vectors, weave
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_setup_args(parser)
    parser.add_argument("--pretrained-visual", type=Path, required=True)
    parser.add_argument("--task-vectors", type=Path, nargs="+", required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    args = parser.parse_args(argv)
    p = common.load_params("model", "setups", "merge", "sweep", "evaluate")
    model, device, problems = common.load_setup(args, p)
    base = vectors.load(args.pretrained_visual)
    task_vectors = common.load_task_vectors(args.task_vectors)
    lambdas, results, rows = p["sweep"]["lambdas"], {}, []
    for problem in problems:
        members = [task_vectors[name] for name in problem.members]
        for name, hyperparameters in p["merge"]["methods"].items():
            fixed = {k: v for k, v in (hyperparameters or {}).items() if k != "lam"}
            candidates = weave.lambda_candidates(name, members, lambdas, fixed)
            curves = {f"{lam:g}": protocol.score(model, vectors.apply(base, dict(c)),
                                                  problem.eval_sets, device=device,
                                                  batch_size=p["evaluate"]["batch_size"])
                      for lam, c in zip(lambdas, candidates, strict=True)}  # fmt: skip
            val = {
                lam: {s: acc["val"] for s, acc in by_set.items()} for lam, by_set in curves.items()
            }
            best = protocol.oracle(val, problem.primary)
            results.setdefault(problem.name, {})[name] = {
                "curves": curves, "oracle_lam": float(best), "oracle": curves[best],
                "best_lambdas": protocol.best_lambdas(val)}  # fmt: skip
            rows += [{"problem": problem.name, "method": name, "lam": float(lam), "set": s, **acc}
                     for lam, by_set in curves.items() for s, acc in by_set.items()]  # fmt: skip
    common.write_json(args.metrics, results)
    args.plots.parent.mkdir(parents=True, exist_ok=True)
    with open(args.plots, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["problem", "method", "lam", "set", "val", "test"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
