"""One merge method on every unit: its data-free default, and its accuracy-vs-lambda sweep with
the oracle lambda picked on the validation split.

    python -m stages.merge ties --pretrained models/pretrained.safetensors \
        --pretrained-visual models/pretrained_visual.safetensors --heads-dir models/heads \
        --data-dir data --task-vectors-dir models/task_vectors \
        --out metrics/merge/ties.json --plot plots/sweep/ties.csv

Task vectors are read lazily, one tensor at a time; each merge is written into the model key by
key and scored (mergeloom.scoring): no merged state dict is built. Merged weights are not kept
(any of them is one `mergeloom merge` call away from the stored experts); the metrics and curves
are. The oracle uses privileged data
(validation labels): an upper bound for data-free methods, never selected on the test split.
"""

import argparse
from pathlib import Path

from mergeloom import methods, protocol, scoring, vectors, weave
from mergeloom.device import compute_on
from mergeloom.progress import progress
from stages import common


def sweep(score, members: list, name: str, hp: dict, lambdas: list, problem) -> dict:
    """Accuracy at each lambda; the candidates are lazy views (offset + lambda * direction)."""
    fixed = {k: v for k, v in hp.items() if k != "lam"}
    curves = {}
    for lam, candidate in zip(lambdas, weave.lambda_candidates(name, members, lambdas, fixed),
                              strict=True):  # fmt: skip
        curves[f"{lam:g}"] = score(problem.eval_sets, delta=candidate)
    val = {lam: {s: acc["val"] for s, acc in sets.items()} for lam, sets in curves.items()}
    best = protocol.oracle(val, problem.primary)
    return {"curves": curves, "oracle_lam": float(best), "oracle": curves[best],
            "best_lambdas": protocol.best_lambdas(val)}  # fmt: skip


def _merge_all(by_unit: dict, score, args: argparse.Namespace, hp: dict,
               lambdas: list) -> tuple[dict, list]:  # fmt: skip
    """(unit -> problem -> default and sweep results, the sweep's CSV rows)."""
    method = methods.get(args.method)
    results, rows = {}, []
    pairs = [(unit, problem) for unit, problems in by_unit.items() for problem in problems]
    for unit, problem in progress(pairs, desc=f"merge {args.method}", unit="problem", leave=False):
        members = [vectors.SafetensorsFile(args.task_vectors_dir / unit / f"{t}.safetensors")
                   for t in problem.members]  # fmt: skip
        default = score(problem.eval_sets, delta=method(members, **hp))
        result = sweep(score, members, args.method, hp, lambdas, problem)
        results.setdefault(unit, {})[problem.name] = {"default": default, **result}
        rows += [{"unit": unit, "problem": problem.name, "lam": float(lam), "set": s, **acc}
                 for lam, sets in result["curves"].items()
                 for s, acc in sets.items()]  # fmt: skip
    return results, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    for name in ("--pretrained", "--pretrained-visual", "--heads-dir", "--data-dir",
                 "--task-vectors-dir", "--out", "--plot"):  # fmt: skip
        parser.add_argument(name, type=Path, required=True)
    args = common.parse_args(parser, argv)
    p = common.load_params("model", "data", "setups", "sweep", "merge")
    if args.method not in p["merge"]["methods"]:
        raise ValueError(f"{args.method!r} is not in merge.methods {list(p['merge']['methods'])}")
    hp = dict(p["merge"]["methods"][args.method] or {})
    try:
        methods.check_hyperparameters(args.method, hp)
    except ValueError as err:
        raise ValueError(f"params.yaml: merge.methods.{err}") from None
    methods.check_lambdas(p["sweep"]["lambdas"], "params.yaml: sweep.lambdas")
    rt = common.runtime()
    by_unit, score = scoring.for_units(
        p, rt, pretrained=args.pretrained, pretrained_visual=args.pretrained_visual,
        data_dir=args.data_dir, heads_dir=args.heads_dir,
    )  # fmt: skip
    with compute_on(rt["device"]):  # the merges; scoring has its own device argument
        results, rows = _merge_all(by_unit, score, args, hp, p["sweep"]["lambdas"])
    common.write_json(args.out, results)
    common.write_csv(args.plot, rows, ["unit", "problem", "lam", "set", "val", "test"])
    n_problems, n_lambdas = sum(len(r) for r in results.values()), len(p["sweep"]["lambdas"])
    common.log.info("merged with %s on %d problems (default, %d lambdas); wrote %s and %s",
                    args.method, n_problems, n_lambdas, args.out, args.plot)  # fmt: skip


if __name__ == "__main__":
    common.run(main)
