"""Baselines of every unit: the zero-shot model and each individual expert on every eval set.

    python -m stages.baselines --pretrained models/pretrained.safetensors \
        --pretrained-visual models/pretrained_visual.safetensors --heads-dir models/heads \
        --data-dir data --experts-dir models/experts \
        --out metrics/baselines.json
"""

import argparse
from pathlib import Path

from mergeloom import protocol, scoring, setups, vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--pretrained", "--pretrained-visual", "--heads-dir", "--data-dir",
                 "--experts-dir", "--out"):  # fmt: skip
        parser.add_argument(name, type=Path, required=True)
    args = common.parse_args(parser, argv)
    p = common.load_params("model", "data", "setups")
    rt = common.runtime()
    by_unit, score = scoring.for_units(
        p, rt, pretrained=args.pretrained, pretrained_visual=args.pretrained_visual,
        data_dir=args.data_dir, heads_dir=args.heads_dir,
    )  # fmt: skip
    units = setups.units(p["setups"])
    zero_shot, results = {}, {}
    for unit, problems in by_unit.items():
        sets = protocol.eval_sets_of(problems)
        setup = units[unit].setup
        if setup not in zero_shot:  # the same model on the same sets for both continual units
            zero_shot[setup] = score(sets, delta={})
        experts = {t: args.experts_dir / unit / f"{t}.safetensors" for t in units[unit].tasks}
        results[unit] = {"zeroshot": zero_shot[setup],
                         "experts": {t: score(sets, visual=vectors.load(e))
                                     for t, e in experts.items()}}  # fmt: skip
    common.write_json(args.out, results)
    n_experts = sum(len(r["experts"]) for r in results.values())
    common.log.info("scored zero-shot and %d experts on %d units; wrote %s", n_experts,
                    len(results), args.out)  # fmt: skip


if __name__ == "__main__":
    common.run(main)
