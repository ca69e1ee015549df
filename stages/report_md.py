"""`reports/summary.md`: the results tables a researcher pastes into a draft, and their figures.

Tables follow the Weight Weaving paper's layout: zero-shot, individual experts, then per method
its data-free default, + weave per pool and the oracle-lambda row (privileged validation data,
marked with a dagger); columns are per-task test accuracy, average absolute and average
normalised accuracy. Called by stages.report, which owns the files.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from stages import figures

DAGGER = "†"
ANALYSIS_COLUMNS = {  # label -> path into metrics/analysis/<setup>.json (per kind)
    "mean cosine": ("correlation", "cosine_mean_off_diagonal"),
    "alignment ‖Στ‖/Σ‖τ‖": ("correlation", "alignment_ratio"),
    "stack eff. rank": ("correlation", "stack_effective_rank"),
    "pairwise sign conflicts": ("redundancy", "all", "sign_conflict_pairwise"),
    "Jaccard top10%": ("redundancy", "top10%", "jaccard"),
    "mass in top10%": ("redundancy", "top10%", "mass_share"),
    "eff. rank / r (uncentred)": ("spectra", "uncentered", "effective_rank_ratio"),
    "eff. rank / r (centred)": ("spectra", "centered", "effective_rank_ratio"),
    "TSV interference (rel.)": ("spectra", "singular_task_interference", "relative"),
}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _row_order(name: str) -> tuple:
    """zero-shot, experts, then per method: default, + weave per pool, @ oracle lambda."""
    top = ["zero-shot", "individual experts"]
    if name in top:
        return (top.index(name),)
    method, _, variant = name.partition(" ")
    return (2, method, 2 if variant.startswith("@") else 1 if variant else 0, variant)


def results_table(table: Mapping) -> str:
    """One unit's rows as a markdown table (values in %)."""
    rows = {name: table["rows"][name] for name in sorted(table["rows"], key=_row_order)}
    sets = list(rows["zero-shot"]["per_set"])
    head = ["", *sets, "avg abs.", "avg norm."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        label = f"{name} {DAGGER}" if row["privileged"] else name
        cells = [_pct(row["per_set"].get(s)) for s in sets]
        cells += [_pct(row["absolute"]), _pct(row["normalized"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _dig(node: object, path: Sequence[str]) -> float | None:
    for part in path:
        node = node.get(part) if isinstance(node, Mapping) else None
    return node if isinstance(node, int | float) else None


def analysis_table(analyses: Mapping[str, Mapping]) -> str:
    """Correlation summary per setup and kind of task vector (individual, sequential, ...)."""
    head = ["setup", "task vectors", *ANALYSIS_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setup, kinds in analyses.items():
        for kind, result in kinds.items():
            values = [_dig(result, path) for path in ANALYSIS_COLUMNS.values()]
            cells = ["-" if v is None else f"{v:.3f}" for v in values]
            lines.append(f"| {setup} | {kind.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gathered(results: Mapping, *path: str) -> dict:
    """{set: scores} over the problems of a unit: each set comes from the problem scoring it."""
    out = {}
    for problem in results.values():
        for part in path:
            problem = problem[part]
        out |= problem
    return out


def lambda_panels(unit: Mapping, lams: Mapping[str, float], primary: Sequence[str]) -> dict:
    """Per method: test accuracy vs lambda per evaluation set, the average over the headline
    sets, and marks for the data-free default (at its lambda from params), the oracle (median
    oracle lambda over problems) and each weave pool."""

    def headline(scores: Mapping[str, Mapping]) -> float:
        return statistics.fmean(scores[s]["test"] for s in primary)

    panels = {}
    for method in next(iter(unit["sweep"].values())):
        first = next(iter(unit["sweep"].values()))[method]
        labels = sorted(first["curves"], key=float)
        grid = [float(lam) for lam in labels]
        curves = [_gathered(unit["sweep"], method, "curves", lam) for lam in labels]
        oracle_lams = [problem[method]["oracle_lam"] for problem in unit["sweep"].values()]
        panel = {
            "tasks": {s: (grid, [c[s]["test"] for c in curves]) for s in curves[0]},
            "average": (grid, [headline(c) for c in curves]),
            "oracle": (statistics.median(oracle_lams),
                       headline(_gathered(unit["sweep"], method, "oracle"))),
        }  # fmt: skip
        if method in lams:
            panel["default"] = (lams[method], headline(_gathered(unit["merge"], method)))
        pools = next(iter(unit["weave"].values())).get(method, {})
        panel["weave"] = {p: headline(_gathered(unit["weave"], method, p, "scores")) for p in pools}
        panels[method] = panel
    return panels


def document(details: Mapping, analyses: Mapping, figure_names: Mapping[str, str]) -> str:
    parts = ["# Results", "",
             "Test accuracy (%) of the embedded default, generated by the `report` stage from "
             "`metrics/`. " + DAGGER + " marks rows that pick lambda on privileged validation "
             "labels (the oracle): an upper bound, not a data-free result. Normalised accuracy "
             "divides by each task's individual expert.", ""]  # fmt: skip
    for unit, table in details.items():
        parts += [f"## {unit}", "", f"Headline average over: {', '.join(table['primary'])}.", "",
                  results_table(table), "",
                  f"![accuracy vs lambda, {unit}]({figure_names[unit]})", ""]  # fmt: skip
    parts += ["## Across setups", "",
              f"![method ranking]({figure_names['ranking']})", "",
              f"![per-task optimal lambda]({figure_names['optimal_lambdas']})", ""]  # fmt: skip
    if analyses:
        parts += ["## Task-vector correlation and redundancy", "",
                  "From the `analyze` stage (`metrics/analysis/`); sequential vectors are "
                  "cumulative (tau_t = theta_t - theta_0), increments are theta_t - theta_t-1.",
                  "", analysis_table(analyses), ""]  # fmt: skip
        parts += [f"![cosine, {setup}]({figure_names['analysis'][setup]})" for setup in analyses]
        parts.append("")
    return "\n".join(parts)


def write_text(path: Path, text: str) -> None:
    """The markdown, written atomically like every other output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_figures(details: Mapping, metrics: Mapping, lams: Mapping[str, float], folder: Path,
                  relative_to: Path) -> dict:  # fmt: skip
    """Draw every figure under ``folder``; return their paths relative to the markdown file.

    ``metrics`` is unit -> {"merge", "sweep", "weave"} as the merge and weave stages wrote them.
    """
    names = {}
    for unit, table in details.items():
        path = folder / f"lambda_{unit}.png"
        panels = lambda_panels(metrics[unit], lams, table["primary"])
        figures.lambda_curves(panels, path, f"{unit}: test accuracy vs lambda")
        names[unit] = Path(os.path.relpath(path, relative_to)).as_posix()
    optimal = {unit: {m: [lam for problem in metrics[unit]["sweep"].values()
                          for s, lam in problem[m]["best_lambdas"].items() if s != "all"]
                      for m in next(iter(metrics[unit]["sweep"].values()))}
               for unit in details}  # fmt: skip
    ranking = {unit: {m: {"default": t["rows"][m]["absolute"],
                          "best weave": max([r["absolute"] for n, r in t["rows"].items()
                                             if n.startswith(f"{m} + weave")] or [math.nan]),
                          f"oracle {DAGGER}": t["rows"][f"{m} @ oracle lambda"]["absolute"]}
                      for m in optimal[unit]}
               for unit, t in details.items()}  # fmt: skip
    for name, draw in (("optimal_lambdas", lambda path: figures.boxes(
            optimal, path, "per-task optimal lambda (validation), per method", "lambda")),
                       ("ranking", lambda path: figures.bars(
            ranking, path, "methods: headline test accuracy", "accuracy"))):  # fmt: skip
        draw(folder / f"{name}.png")
        names[name] = Path(os.path.relpath(folder / f"{name}.png", relative_to)).as_posix()
    return names
