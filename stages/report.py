"""Results table of every setup: zero-shot, experts, each method at its default, + weave per
pool, at the oracle lambda (privileged validation data), with absolute and normalised accuracy.

    python -m stages.report --units multitask continual continual_sequential domains \
        --metrics-dir metrics --out metrics/summary.json --details metrics/details.json
"""

import argparse
import json
import statistics
from pathlib import Path

from mergeloom import protocol
from stages import common


def _row(per_set: dict, primary: list, experts: dict, privileged: bool = False) -> dict:
    norm = protocol.normalized({s: per_set[s] for s in per_set if s in experts}, experts)
    return {"per_set": per_set, "privileged": privileged,
            "absolute": statistics.fmean(per_set[s] for s in primary),
            "normalized": statistics.fmean(norm.values()) if norm else None}  # fmt: skip


def unit_table(metrics: dict) -> dict:
    base, merged, sweep, woven = (metrics[k] for k in ("baselines", "merge", "sweep", "weave"))
    test = lambda scores: {s: acc["test"] for s, acc in scores.items()}  # noqa: E731
    experts = {s: base["experts"][s][s]["test"] for s in base["experts"] if s in base["zeroshot"]}
    sets = list(test(base["zeroshot"]))
    primary = ["all"] if "all" in sets else sets  # continual: the 10-way test set is headline

    def over_problems(get) -> dict:  # {set: acc}, each set scored by its own problem's model
        return {s: a for problem in merged for s, a in test(get(problem)).items()}

    rows = {"zero-shot": _row(test(base["zeroshot"]), primary, experts),
            "individual experts": {"per_set": experts, "privileged": False,
                                   "absolute": statistics.fmean(experts.values()),
                                   "normalized": 1.0}}  # fmt: skip
    dispersion = {}
    for method in next(iter(merged.values())):
        rows[method] = _row(over_problems(lambda pr, m=method: merged[pr][m]), primary, experts)
        for pool in next(iter(woven.values())).get(method, {}):
            rows[f"{method} + weave ({pool})"] = _row(
                over_problems(lambda pr, m=method, pool=pool: woven[pr][m][pool]["scores"]),
                primary,
                experts,
            )
        rows[f"{method} @ oracle lambda"] = _row(
            over_problems(lambda pr, m=method: sweep[pr][m]["oracle"]), primary, experts, True
        )
        best = [lam for pr in sweep.values() for s, lam in pr[method]["best_lambdas"].items()
                if s != "all"]  # fmt: skip
        dispersion[method] = protocol.dispersion(best)
    return {"rows": rows, "primary": primary, "lambda_dispersion": dispersion}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", nargs="+", required=True)
    parser.add_argument("--metrics-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--details", type=Path, required=True)
    args = parser.parse_args(argv)
    details = {}
    for unit in args.units:
        files = {k: args.metrics_dir / unit / f"{k}.json"
                 for k in ("baselines", "merge", "sweep", "weave")}  # fmt: skip
        details[unit] = unit_table({k: json.loads(f.read_text()) for k, f in files.items()})
    summary = {}
    for unit, table in details.items():
        summary[unit] = {name: {k: round(row[k], 4) for k in ("absolute", "normalized")
                                if row[k] is not None}
                         for name, row in table["rows"].items()}  # fmt: skip
        summary[unit]["per-set optimal lambda IQR"] = {
            m: round(d["iqr"], 4) for m, d in table["lambda_dispersion"].items()}  # fmt: skip
    common.write_json(args.details, details)
    common.write_json(args.out, summary)


if __name__ == "__main__":
    common.run(main)
