"""Weight Weaving of every lambda-scaled method with every pool, for every merge problem.

    python -m stages.weave --pretrained models/pretrained.safetensors \
        --pretrained-visual models/pretrained_visual.safetensors --data-dir data \
        --heads-dir models/heads --task-vectors-dir models/task_vectors --metrics-dir metrics
"""

import argparse
from pathlib import Path

from mergeloom import evaluate, vectors, weave
from stages import common


def _without_lam(hyperparameters: dict | None) -> dict:
    return {k: v for k, v in (hyperparameters or {}).items() if k != "lam"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--pretrained", "--pretrained-visual", "--data-dir", "--heads-dir",
                 "--task-vectors-dir", "--metrics-dir"):  # fmt: skip
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args(argv)
    common.check_pipeline()
    p = common.load_params("model", "setups", "merge", "weave", "evaluate")
    cfg, merge_hp = p["weave"], p["merge"]["methods"]
    model, device = common.load_model(p, args.pretrained)
    base = vectors.load(args.pretrained_visual)
    for unit, (setup, tasks) in common.units(p["setups"]).items():
        task_vectors = common.load_dir(args.task_vectors_dir / unit, tasks)
        results: dict = {}
        for problem in common.problems(setup, tasks, p, args.data_dir, args.heads_dir):
            members = [task_vectors[n] for n in problem.members]
            lam_eff = weave.effective_lam(len(members), cfg["lambdas"], cfg["collaborative"])
            for name in cfg["methods"]:
                for pool in cfg["pools"]:
                    delta = weave.weave(
                        name,
                        members,
                        {"lam": cfg["lambdas"]},
                        pool,
                        collaborative=cfg["collaborative"],
                        seed=cfg["seed"],
                        hyperparameters=_without_lam(merge_hp[name]),
                        pool_hyperparameters=_without_lam(merge_hp.get(pool)),
                    )
                    scores = evaluate.score(model, vectors.apply(base, delta), problem.eval_sets,
                                            device=device, splits=("test",),
                                            batch_size=p["evaluate"]["batch_size"])  # fmt: skip
                    results.setdefault(problem.name, {}).setdefault(name, {})[pool] = {
                        "scores": scores, "effective_lam": lam_eff}  # fmt: skip
        common.write_json(args.metrics_dir / unit / "weave.json", results)


if __name__ == "__main__":
    common.run(main)
