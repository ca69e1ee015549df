"""Results of every setup: zero-shot, experts, each method at its default, + weave per pool,
at the oracle lambda (privileged validation data), with absolute and normalised accuracy.

    python -m stages.report --metrics-dir metrics --headline metrics/headline.json \
        --out metrics/summary.json --details reports/details.json \
        --markdown reports/summary.md --figures-dir plots/report

Reads `metrics/baselines.json`, `metrics/merge/<method>.json` for every method of
`merge.methods` and `metrics/weave/<method>.json` for every method of `weave.methods` (by name:
files of removed methods are ignored).

Writes the headline (`metrics/headline.json`, the only file under DVC's `metrics:`, so
`dvc exp show`, `dvc metrics diff` and the pull-request comment show what matters), every row in
`metrics/summary.json`, the full tables in `reports/details.json`, and `reports/summary.md`
(tables to paste into a draft, the correlation summary of the analyze stage, and figures)
through stages.report_md.
"""

import argparse
import json
import os
import statistics
from pathlib import Path

from mergeloom import protocol, setups
from stages import common, report_md

MAX_HEADLINE_VALUES = 150  # `dvc exp show` stays readable (tests hold the default to it)


def _row(per_set: dict, primary: list, experts: dict, privileged: bool = False) -> dict:
    norm = protocol.normalized({s: per_set[s] for s in per_set if s in experts}, experts)
    return {"per_set": per_set, "privileged": privileged,
            "absolute": statistics.fmean(per_set[s] for s in primary),
            "normalized": statistics.fmean(norm.values()) if norm else None}  # fmt: skip


def unit_table(metrics: dict) -> dict:
    """Every row averages the same sets: absolute over `primary`, normalised over the sets
    that have an expert of their own (`normalized_over`)."""
    base, merged, sweep, woven = (metrics[k] for k in ("baselines", "merge", "sweep", "weave"))
    test = lambda scores: {s: acc["test"] for s, acc in scores.items()}  # noqa: E731
    experts = {s: base["experts"][s][s]["test"] for s in base["experts"] if s in base["zeroshot"]}
    sets = list(test(base["zeroshot"]))
    primary = ["all"] if "all" in sets else sets  # continual: the 10-way test set is headline
    # a set without an expert of its own (continual's 10-way `all`): the experts' mean on it
    on_every_set = {s: experts[s] if s in experts else statistics.fmean(
        base["experts"][e][s]["test"] for e in base["experts"]) for s in sets}  # fmt: skip

    def over_problems(get) -> dict:  # {set: acc}, each set scored by its own problem's model
        return {s: a for problem in merged for s, a in test(get(problem)).items()}

    rows = {"zero-shot": _row(test(base["zeroshot"]), primary, experts),
            "individual experts": _row(on_every_set, primary, experts)}  # fmt: skip
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
    return {"rows": rows, "primary": primary, "normalized_over": list(experts),
            "identical": identical_rows(rows, sweep), "lambda_dispersion": dispersion}  # fmt: skip


def identical_rows(rows: dict, sweep: dict) -> list[dict]:
    """Groups of rows with the same test accuracy on every set, each with the sweep points
    (method at a lambda) that score the same: the evidence for why they coincide."""
    groups: dict[tuple, list[str]] = {}
    for name, row in rows.items():
        groups.setdefault(tuple(sorted(row["per_set"].items())), []).append(name)
    first = next(iter(sweep.values()))
    points = {(m, float(lam)): tuple(sorted({s: acc["test"] for pr in sweep.values()
                                              for s, acc in pr[m]["curves"][lam].items()}.items()))
              for m in first for lam in first[m].get("curves", {})}  # fmt: skip
    return [{"rows": names, "equal_to": [list(p) for p, key in points.items() if key == scores]}
            for scores, names in groups.items() if len(names) > 1]  # fmt: skip


def headline(details: dict, pools: list[str]) -> dict:
    """{unit: {method: {variant: absolute accuracy}}}: the data-free default and the weave
    with the first pool of `weave.pools`, plus zero_shot and individual_experts. The oracle,
    the other pools and the normalised values stay in metrics/summary.json: with every
    variant the embedded default would be 4 units x 62 rows, too many columns to read."""
    pool = pools[0]
    out = {}
    for unit, table in details.items():
        rows = table["rows"]
        zero_shot = rows["zero-shot"]  # normalised is None where no set has its own expert
        out[unit] = {"zero_shot": {k: round(zero_shot[k], 4) for k in ("absolute", "normalized")
                                   if zero_shot[k] is not None},
                     "individual_experts": {"absolute": round(
                         rows["individual experts"]["absolute"], 4)}}  # fmt: skip
        for method in table["lambda_dispersion"]:  # every method, in params order
            variants = {"default": method, f"weave_{pool}": f"{method} + weave ({pool})"}
            out[unit][method] = {k: round(rows[r]["absolute"], 4) for k, r in variants.items()
                                 if r in rows}  # fmt: skip
    return out


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"metrics file not found: {path}; run `dvc repro`")
    return json.loads(path.read_text())


def unit_metrics(folder: Path, unit: str, merged: list, woven: list, pools: list) -> dict:
    """One unit's results as {baselines, merge, sweep, weave}, each {problem: {method: ...}}."""
    out: dict = {"baselines": _read(folder / "baselines.json")[unit], "merge": {}, "sweep": {},
                 "weave": {}}  # fmt: skip
    for method in merged:
        for problem, r in _read(folder / "merge" / f"{method}.json")[unit].items():
            out["merge"].setdefault(problem, {})[method] = r["default"]
            out["sweep"].setdefault(problem, {})[method] = {k: v for k, v in r.items()
                                                            if k != "default"}  # fmt: skip
    for method in woven:
        for problem, r in _read(folder / "weave" / f"{method}.json")[unit].items():
            out["weave"].setdefault(problem, {})[method] = {p: r[p] for p in pools}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics-dir", type=Path, required=True)
    for name in ("--headline", "--out", "--details", "--markdown", "--figures-dir"):
        parser.add_argument(name, type=Path, required=True)
    args = common.parse_args(parser, argv)
    p = common.load_params("setups", "merge", "weave")
    details, metrics = {}, {}
    for unit in setups.units(p["setups"]):
        metrics[unit] = unit_metrics(args.metrics_dir, unit, list(p["merge"]["methods"]),
                                     p["weave"]["methods"], p["weave"]["pools"])  # fmt: skip
        details[unit] = unit_table(metrics[unit])
    summary = {}
    for unit, table in details.items():
        summary[unit] = {name: {k: round(row[k], 4) for k in ("absolute", "normalized")
                                if row[k] is not None}
                         for name, row in table["rows"].items()}  # fmt: skip
        summary[unit]["per-set optimal lambda IQR"] = {
            m: round(d["iqr"], 4) for m, d in table["lambda_dispersion"].items()}  # fmt: skip
    common.write_json(args.details, details)
    common.write_json(args.out, summary)
    values = headline(details, p["weave"]["pools"])
    common.write_json(args.headline, values)
    write_markdown(args, p, details, metrics)
    n_values = sum(len(variants) for rows in values.values() for variants in rows.values())
    if n_values > MAX_HEADLINE_VALUES:
        common.log.warning("%s holds %d values (> %d): `dvc exp show` gets hard to read",
                           args.headline, n_values, MAX_HEADLINE_VALUES)  # fmt: skip
    common.log.info("%d units: wrote %s (%d values), %s, %s and %s", len(details), args.headline,
                    n_values, args.out, args.details, args.markdown)  # fmt: skip


def write_markdown(args: argparse.Namespace, p: dict, details: dict, metrics: dict) -> None:
    lams = {m: hp["lam"] for m, hp in p["merge"]["methods"].items() if hp and "lam" in hp}
    root = args.markdown.parent
    names = report_md.write_figures(details, metrics, lams, args.figures_dir, root)
    analyses = {s: json.loads(f.read_text()) for s in p["setups"]
                if (f := args.metrics_dir / "analysis" / f"{s}.json").exists()}  # fmt: skip
    names["analysis"] = {s: os.path.relpath(f"plots/analysis/{s}/cosine.png", root)
                         for s in analyses}  # fmt: skip
    common.write_text(args.markdown, report_md.document(details, analyses, names))


if __name__ == "__main__":
    common.run(main)
