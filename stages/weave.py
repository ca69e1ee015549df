"""Weight Weaving of one lambda-scaled method with every pool, on every unit.

    python -m stages.weave ties --pretrained models/pretrained.safetensors \
        --pretrained-visual models/pretrained_visual.safetensors --heads-dir models/heads \
        --data-dir data --task-vectors-dir models/task_vectors \
        --out metrics/weave/ties.json

The method's hyperparameters come from `merge.methods.<method>` (lam excepted: weaving searches
over `weave.lambdas`); a method used as a pool takes `weave.pool_hyperparameters.<pool>`.
One woven update is held at a time: built, written into the model, scored on test, dropped.
"""

import argparse
from pathlib import Path

from mergeloom import methods, scoring, vectors, weave
from mergeloom.device import compute_on
from mergeloom.progress import progress
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    for name in ("--pretrained", "--pretrained-visual", "--heads-dir", "--data-dir",
                 "--task-vectors-dir", "--out"):  # fmt: skip
        parser.add_argument(name, type=Path, required=True)
    args = common.parse_args(parser, argv)
    p = common.load_params("model", "data", "setups", "merge", "weave")
    cfg = p["weave"]
    if args.method not in cfg["methods"]:
        raise ValueError(f"{args.method!r} is not in weave.methods {cfg['methods']}")
    hp = {k: v for k, v in (p["merge"]["methods"][args.method] or {}).items() if k != "lam"}
    checks = {f"merge.methods.{args.method}": (args.method, hp)} | {
        f"weave.pool_hyperparameters.{pool}": (pool, h)
        for pool, h in cfg["pool_hyperparameters"].items()}  # fmt: skip
    for key, (name, h) in checks.items():
        try:
            methods.check_hyperparameters(name, h)
        except ValueError as err:
            raise ValueError(f"params.yaml: {key}: {err}") from None
    methods.check_lambdas(cfg["lambdas"], "params.yaml: weave.lambdas")
    rt = common.runtime()
    by_unit, score = scoring.for_units(
        p, rt, pretrained=args.pretrained, pretrained_visual=args.pretrained_visual,
        data_dir=args.data_dir, heads_dir=args.heads_dir,
    )  # fmt: skip
    with compute_on(rt["device"]):  # the weaves; scoring has its own device argument
        woven = _weave_all(by_unit, score, args, cfg, hp)
    common.write_json(args.out, woven)
    n_problems = sum(len(r) for r in woven.values())
    common.log.info("wove %s with %d pools on %d problems; wrote %s", args.method,
                    len(cfg["pools"]), n_problems, args.out)  # fmt: skip


def _weave_all(by_unit: dict, score, args: argparse.Namespace, cfg: dict, hp: dict) -> dict:
    """unit -> problem -> pool -> test scores and effective lambda of every woven update."""
    results: dict = {}
    pairs = [(unit, problem) for unit, problems in by_unit.items() for problem in problems]
    for unit, problem in progress(pairs, desc=f"weave {args.method}", unit="problem", leave=False):
        members = [vectors.SafetensorsFile(args.task_vectors_dir / unit / f"{t}.safetensors")
                   for t in problem.members]  # fmt: skip
        lam_eff = weave.effective_lam(len(members), cfg["lambdas"], cfg["collaborative"])
        for pool in cfg["pools"]:
            delta = weave.weave(
                args.method,
                members,
                {"lam": cfg["lambdas"]},
                pool,
                collaborative=cfg["collaborative"],
                seed=cfg["seed"],
                hyperparameters=hp,
                pool_hyperparameters=cfg["pool_hyperparameters"].get(pool),
            )
            scores = score(problem.eval_sets, delta=delta, splits=("test",))
            del delta  # the next pool's weave must not find this one still held
            results.setdefault(unit, {}).setdefault(problem.name, {})[pool] = {
                "scores": scores, "effective_lam": lam_eff}  # fmt: skip
    return results


if __name__ == "__main__":
    common.run(main)
