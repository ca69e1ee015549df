"""Every method at its data-free default, and its accuracy-vs-lambda sweep with the oracle
lambda picked on the validation split, for every merge problem of every unit.

    python -m stages.merge --pretrained models/pretrained.safetensors \
        --pretrained-visual models/pretrained_visual.safetensors --data-dir data \
        --heads-dir models/heads --task-vectors-dir models/task_vectors \
        --metrics-dir metrics --plots-dir plots

Merged weights are not kept (any of them is one `mergeloom merge` call away, from the experts
the pipeline stores); the metrics and curves are.

The oracle uses privileged data (validation labels of the evaluated tasks, or of the held-out
domain): an upper bound for data-free methods, never selected on the test split.
"""

import argparse
from pathlib import Path

from mergeloom import evaluate, methods, protocol, vectors, weave
from stages import common


def sweep(score, base: dict, members: list, name: str, hp: dict, lambdas: list, primary) -> dict:
    fixed = {k: v for k, v in hp.items() if k != "lam"}
    candidates = weave.lambda_candidates(name, members, lambdas, fixed)
    curves = {f"{lam:g}": score(vectors.apply(base, dict(c)))
              for lam, c in zip(lambdas, candidates, strict=True)}  # fmt: skip
    val = {lam: {s: acc["val"] for s, acc in sets.items()} for lam, sets in curves.items()}
    best = protocol.oracle(val, primary)
    return {"curves": curves, "oracle_lam": float(best), "oracle": curves[best],
            "best_lambdas": protocol.best_lambdas(val)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--pretrained", "--pretrained-visual", "--data-dir", "--heads-dir",
                 "--task-vectors-dir", "--metrics-dir", "--plots-dir"):  # fmt: skip
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args(argv)
    common.check_pipeline()
    p = common.load_params("model", "setups", "merge", "sweep", "evaluate")
    model, device = common.load_model(p, args.pretrained)
    base = vectors.load(args.pretrained_visual)
    for unit, (setup, tasks) in common.units(p["setups"]).items():
        task_vectors = common.load_dir(args.task_vectors_dir / unit, tasks)
        defaults, sweeps, rows = {}, {}, []
        for problem in common.problems(setup, tasks, p, args.data_dir, args.heads_dir):
            members = [task_vectors[n] for n in problem.members]

            def score(visual: dict, sets=problem.eval_sets) -> dict:
                return evaluate.score(model, visual, sets, device=device,
                                      batch_size=p["evaluate"]["batch_size"])  # fmt: skip

            for name, hp in p["merge"]["methods"].items():
                visual = vectors.apply(base, methods.get(name)(members, **(hp or {})))
                defaults.setdefault(problem.name, {})[name] = score(visual)
                result = sweep(score, base, members, name, hp or {}, p["sweep"]["lambdas"],
                               problem.primary)  # fmt: skip
                sweeps.setdefault(problem.name, {})[name] = result
                rows += [{"problem": problem.name, "method": name, "lam": float(lam), "set": s,
                          **acc} for lam, sets in result["curves"].items()
                         for s, acc in sets.items()]  # fmt: skip
        common.write_json(args.metrics_dir / unit / "merge.json", defaults)
        common.write_json(args.metrics_dir / unit / "sweep.json", sweeps)
        common.write_csv(args.plots_dir / unit / "sweep.csv", rows,
                         ["problem", "method", "lam", "set", "val", "test"])  # fmt: skip


if __name__ == "__main__":
    common.run(main)
