"""`reports/summary.md`: the results tables a researcher pastes into a draft, and their figures.

It leads with the answer: one headline table (method x unit, average absolute and normalised
accuracy, the best data-free row of each column in bold, rows that coincide explained), then
per unit the table in the Weight Weaving paper's layout: zero-shot, individual experts, then
per method its data-free default, + weave per pool and the oracle-lambda row (privileged
validation data, marked with a dagger); columns are per-task test accuracy, average absolute
and average normalised accuracy. Called by stages.report, which owns the files.
"""

from __future__ import annotations

import os
import statistics
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


def _table(head: Sequence[str], rows: Mapping[str, Sequence[float | None]],
           contenders: Sequence[str]) -> str:  # fmt: skip
    """A markdown table of percentages; in each column the best of ``contenders`` (as shown,
    ties included) is bold."""
    shown = {name: [_pct(v) for v in values] for name, values in rows.items()}
    for j in range(len(head) - 1):
        column = [float(shown[n][j]) for n in contenders if shown[n][j] != "-"]
        for name in contenders:
            if column and shown[name][j] == f"{max(column):.1f}":
                shown[name][j] = f"**{shown[name][j]}**"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *(f"| {name} | " + " | ".join(cells) + " |"
                                for name, cells in shown.items())])  # fmt: skip


def _label(name: str, row: Mapping) -> str:
    return f"{name} {DAGGER}" if row["privileged"] else name


def _data_free(rows: Mapping[str, Mapping]) -> list[str]:
    """Merged rows that use no labels: the ones the bold mark compares."""
    return [n for n, r in rows.items()
            if not r["privileged"] and n not in ("zero-shot", "individual experts")]  # fmt: skip


def results_table(table: Mapping) -> str:
    """One unit's rows as a markdown table (values in %), the best data-free row per column in
    bold."""
    rows = {name: table["rows"][name] for name in sorted(table["rows"], key=_row_order)}
    sets = list(rows["zero-shot"]["per_set"])
    values = {_label(n, r): [*(r["per_set"].get(s) for s in sets), r["absolute"], r["normalized"]]
              for n, r in rows.items()}  # fmt: skip
    contenders = [_label(n, rows[n]) for n in _data_free(rows)]
    return _table(["", *sets, "avg abs.", "avg norm."], values, contenders)


def headline_table(details: Mapping) -> str:
    """Method x unit: every unit's two averages side by side (values in %), the best
    data-free row per column in bold."""
    units = list(details)
    first = next(iter(details.values()))["rows"]
    names = sorted(first, key=_row_order)
    values = {_label(n, first[n]): [details[u]["rows"].get(n, {}).get(k) for u in units
                                    for k in ("absolute", "normalized")]
              for n in names}  # fmt: skip
    contenders = [_label(n, first[n]) for n in _data_free(first)]
    head = ["", *(f"{u} {k}" for u in units for k in ("abs.", "norm."))]
    return _table(head, values, contenders)


def averaged_sets(table: Mapping) -> str:
    """Which sets every row of a unit averages, said once per table."""
    primary, normalized = table["primary"], table["normalized_over"]
    if primary == normalized:
        return f"both averages over {', '.join(primary)}"
    text = (f"abs. over {', '.join(primary)}; norm. over {', '.join(normalized)} (the sets "
            "with an expert of their own)")  # fmt: skip
    shared = [s for s in primary if s not in normalized]
    if shared:
        text += (f"; individual experts on {', '.join(shared)}: the mean of the "
                 f"{len(normalized)} experts, each scored on it")  # fmt: skip
    return text


def identical_note(group: Mapping) -> str:
    """One line for rows that score the same on every set, with the evidence: the sweep
    points that score the same, and the construction that makes them equal."""
    line = ", ".join(f"`{n}`" for n in group["rows"]) + ": the same test accuracy on every set"
    at = dict(group["equal_to"])
    if at:
        line += ", equal to " + " and ".join(f"`{m}` at lambda {lam:g}" for m, lam in at.items())
        line += " on the sweep"
    if all(n.endswith(" + weave (max_abs)") for n in group["rows"]):
        line += (" (max_abs keeps each entry's largest-magnitude candidate, and these methods "
                 "never make an entry larger than the task vectors' largest: the pool is MagMax "
                 "of the task vectors)")  # fmt: skip
    elif {n.removesuffix(" @ oracle lambda") for n in group["rows"]} == {group["rows"][0]}:
        line += " (the oracle picked the default's lambda)"
    elif {"weight_averaging", "task_arithmetic"} <= set(at):
        mean, summed = at["weight_averaging"], at["task_arithmetic"]
        line += (f" (the mean of {mean / summed:.0f} task vectors scaled by {mean:g} is their "
                 f"sum scaled by {summed:g})")  # fmt: skip
    return line + "."


def identical_notes(details: Mapping) -> list[str]:
    """Every group of coinciding rows once, with the units where it holds."""
    units: dict[str, list[str]] = {}
    for unit, table in details.items():
        for group in table["identical"]:
            units.setdefault(identical_note(group), []).append(unit)
    return [f"- {', '.join(names)}: {note}" for note, names in units.items()]


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
             "divides each set by its own individual expert. **Bold**: the best data-free "
             "merged row of each column (zero-shot, experts and " + DAGGER + " rows excluded).",
             "", "## Headline", "",
             "The averages of every unit's table below, side by side. Every row of a unit "
             "averages the same sets:", ""]  # fmt: skip
    parts += [f"- {unit}: {averaged_sets(table)}." for unit, table in details.items()]
    parts += ["", headline_table(details), ""]
    notes = identical_notes(details)
    if notes:
        parts += ["Rows that coincide, and why:", "", *notes, ""]
    parts += [f"![method ranking]({figure_names['ranking']})", ""]
    for unit, table in details.items():
        parts += [f"## {unit}", "", f"Averages: {averaged_sets(table)}.", "",
                  results_table(table), "",
                  f"![accuracy vs lambda, {unit}]({figure_names[unit]})", ""]  # fmt: skip
    parts += ["## Across setups", "",
              f"![per-task optimal lambda]({figure_names['optimal_lambdas']})", ""]  # fmt: skip
    if analyses:
        parts += ["## Task-vector correlation and redundancy", "",
                  "From the `analyze` stage (`metrics/analysis/`); sequential vectors are "
                  "cumulative (tau_t = theta_t - theta_0), increments are theta_t - theta_t-1.",
                  "", analysis_table(analyses), ""]  # fmt: skip
        parts += [f"![cosine, {setup}]({figure_names['analysis'][setup]})" for setup in analyses]
        parts.append("")
    return "\n".join(parts)


def _variants(rows: Mapping[str, Mapping], method: str) -> dict[str, float]:
    """A method's rows by variant (default, weave (<pool>), oracle †): absolute accuracy."""
    out = {}
    for name in sorted(rows, key=_row_order):
        variant = "default" if name == method else name.removeprefix(f"{method} + ")
        if name == method or name.startswith(f"{method} + "):
            out[variant] = rows[name]["absolute"]
    out[f"oracle {DAGGER}"] = rows[f"{method} @ oracle lambda"]["absolute"]
    return out


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
    ranking = {unit: {m: _variants(t["rows"], m) for m in optimal[unit]}
               for unit, t in details.items()}  # fmt: skip
    for name, draw in (("optimal_lambdas", lambda path: figures.boxes(
            optimal, path, "per-task optimal lambda (validation), per method", "lambda")),
                       ("ranking", lambda path: figures.dots(
            ranking, path, "methods: headline test accuracy, sorted by the data-free default",
            "test accuracy (headline average)"))):  # fmt: skip
        draw(folder / f"{name}.png")
        names[name] = Path(os.path.relpath(folder / f"{name}.png", relative_to)).as_posix()
    return names
