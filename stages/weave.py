"""Weight Weaving of every lambda-scaled method with every pool, for each problem, scored.

python -m stages.weave --setup multitask ... --task-vectors ... \
        --metrics metrics/multitask/weave.json
"""

import argparse
from pathlib import Path

from mergeloom import protocol, vectors, weave
from stages import common


def _without_lam(hyperparameters: dict | None) -> dict:
    return {k: v for k, v in (hyperparameters or {}).items() if k != "lam"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_setup_args(parser)
    parser.add_argument("--pretrained-visual", type=Path, required=True)
    parser.add_argument("--task-vectors", type=Path, nargs="+", required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    p = common.load_params("model", "setups", "merge", "weave", "evaluate")
    model, device, problems = common.load_setup(args, p)
    cfg, merge_hp = p["weave"], p["merge"]["methods"]
    base = vectors.load(args.pretrained_visual)
    task_vectors = common.load_task_vectors(args.task_vectors)
    results: dict = {}
    for problem in problems:
        members = [task_vectors[name] for name in problem.members]
        for name in cfg["methods"]:
            for pool in cfg["pools"]:
                delta = weave.weave(name, members, {"lam": cfg["lambdas"]}, pool,
                                    collaborative=cfg["collaborative"], seed=cfg["seed"],
                                    pool_hyperparameters=_without_lam(merge_hp.get(pool)),
                                    **_without_lam(merge_hp[name]))  # fmt: skip
                scores = protocol.score(
                    model,
                    vectors.apply(base, delta),
                    problem.eval_sets,
                    device=device,
                    batch_size=p["evaluate"]["batch_size"],
                )
                lam_eff = weave.effective_lam(len(members), cfg["lambdas"], cfg["collaborative"])
                results.setdefault(problem.name, {}).setdefault(name, {})[pool] = {
                    "scores": scores, "effective_lam": lam_eff}  # fmt: skip
    common.write_json(args.metrics, results)


if __name__ == "__main__":
    main()
