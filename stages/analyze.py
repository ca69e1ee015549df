"""Correlation and redundancy of one setup's task vectors, individual vs sequential (§5).

    python -m stages.analyze --setup continual --task-vectors-dir models/task_vectors \
        --out metrics/analysis/continual.json --plots-dir plots/analysis/continual

Every unit of the setup is analysed (continual: individual and sequential experts, and the
chain's per-step increments). Scalars go to the metrics JSON; matrices, per-layer profiles
and spectra to CSVs for `dvc plots` and to PNGs.
"""

import argparse
import math
from pathlib import Path

from mergeloom import analysis, setups, vectors
from mergeloom.device import compute_on
from stages import common, figures

PANELS = {"all": "whole block", "attention": "attention", "mlp": "MLP"}


def task_vector_sets(setup: str, config: dict, folder: Path) -> dict[str, tuple[list, list]]:
    """kind -> (task names, lazy task vectors) for every unit of ``setup``."""
    sets = {}
    for unit in setups.units(config).values():
        if unit.setup == setup:
            kind = "sequential" if unit.sequential else "individual"
            tasks = list(unit.tasks)
            tvs = [vectors.SafetensorsFile(folder / unit.name / f"{t}.safetensors") for t in tasks]
            sets[kind] = (tasks, tvs)
            if kind == "sequential":
                sets["sequential_increments"] = (tasks, analysis.increments(tvs))
    return sets


def scalars(node: object, tasks: list) -> object:
    """The JSON-metric part: no matrices or curves, per-task lists keyed by task, NaN -> null."""
    if isinstance(node, dict):
        drop = {"matrices", "layers", "curves"}
        return {k: scalars(v, tasks) for k, v in node.items() if k not in drop}
    if isinstance(node, list) and len(node) == len(tasks):
        return {t: scalars(v, tasks) for t, v in zip(tasks, node, strict=True)}
    if isinstance(node, list):  # sign conflicts among the first 2..T tasks
        return {f"first{i + 2}": scalars(v, tasks) for i, v in enumerate(node)}
    return None if isinstance(node, float) and math.isnan(node) else node


def _series(rows: list[dict], x: str, column: str) -> tuple[list, list]:
    points = [(row[x], row[column]) for row in rows if row.get(column) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def cosine_outputs(pairwise: dict, tasks: dict, folder: Path, title: str) -> None:
    matrices = {k: (tasks[k], r["correlation"]["matrices"]["cosine"].tolist())
                for k, r in pairwise.items()}  # fmt: skip
    rows = [{"kind": k, "task_a": a, "task_b": b, "cosine": round(m[i][j], 6)}
            for k, (names, m) in matrices.items()
            for i, a in enumerate(names) for j, b in enumerate(names)]  # fmt: skip
    common.write_csv(folder / "cosine.csv", rows, ["kind", "task_a", "task_b", "cosine"])
    placeholder = {analysis.PAIRWISE_NOTE: ([], [[math.nan]])}
    figures.heatmaps(matrices or placeholder, folder / "cosine.png",
                     f"{title}: task-vector cosine similarity")  # fmt: skip


def layer_outputs(pairwise: dict, folder: Path, title: str) -> None:
    by_depth: dict[int, dict] = {}
    for kind, r in pairwise.items():
        for row in r["correlation"]["layers"]:
            column = kind if row["group"] == "all" else f"{kind}_{row['group']}"
            by_depth.setdefault(row["depth"], {"depth": row["depth"], "layer": row["layer"]})
            by_depth[row["depth"]][column] = round(row["mean_cosine"], 6)
    rows = [by_depth[d] for d in sorted(by_depth)]
    columns = {g: {k: k if g == "all" else f"{k}_{g}" for k in pairwise} for g in PANELS}
    header = [c for g in PANELS for c in columns[g].values()]
    common.write_csv(folder / "layers.csv", rows, ["depth", "layer", *header])
    panels = {PANELS[g]: {k: _series(rows, "depth", c) for k, c in columns[g].items()}
              for g in PANELS}  # fmt: skip
    ticks = {r["depth"]: r["layer"] for r in rows}
    figures.line_panels(panels, folder / "layers.png", f"{title}: cosine per layer", "layer",
                        "mean off-diagonal cosine", ticks)  # fmt: skip


def spectra_outputs(results: dict, folder: Path, title: str) -> None:
    grid = analysis.SPECTRUM_GRID
    curves = {f"{k}_{v}": c for k, r in results.items()
              for v, c in r["spectra"]["curves"].items()}  # fmt: skip
    rows = [{"rank_fraction": g, **{n: round(c[i], 6) for n, c in curves.items()}}
            for i, g in enumerate(grid)]  # fmt: skip
    common.write_csv(folder / "spectra.csv", rows, ["rank_fraction", *curves])
    panels = {k: {v: (grid, c) for v, c in r["spectra"]["curves"].items()}
              for k, r in results.items()}  # fmt: skip
    figures.line_panels(panels, folder / "spectra.png",
                        f"{title}: singular energy of task-vector matrices (mean over matrices)",
                        "fraction of singular directions", "share of energy")  # fmt: skip


def redundancy_outputs(pairwise: dict, topk: list, folder: Path, title: str) -> None:
    levels = [f"top{100 * k:g}%" for k in sorted(topk)]
    measures = ("jaccard", "sign_conflict", "mass_share")
    rows = [{"k": k, "jaccard_if_independent": round(k / (2 - k), 6),
             **{f"{kind}_{m}": round(r["redundancy"][level][m], 6)
                for kind, r in pairwise.items() for m in measures}}
            for k, level in zip(sorted(topk), levels, strict=True)]  # fmt: skip
    header = [
        "k",
        "jaccard_if_independent",
        *[f"{kind}_{m}" for kind in pairwise for m in measures],
    ]
    common.write_csv(folder / "redundancy.csv", rows, header)
    panels = {m: {kind: _series(rows, "k", f"{kind}_{m}") for kind in pairwise} for m in measures}
    panels["jaccard"]["independent masks"] = _series(rows, "k", "jaccard_if_independent")
    figures.line_panels(panels, folder / "redundancy.png", f"{title}: redundancy of top-k masks",
                        "k (fraction kept per task)", "rate")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", required=True)
    for name in ("--task-vectors-dir", "--out", "--plots-dir"):
        parser.add_argument(name, type=Path, required=True)
    args = common.parse_args(parser, argv)
    p = common.load_params("setups", "analysis")
    sets = task_vector_sets(args.setup, p["setups"], args.task_vectors_dir)
    if not sets:
        raise ValueError(f"--setup {args.setup!r} is unknown; expected one of {list(p['setups'])}")
    with compute_on(common.runtime()["device"]):  # per key on the device, results on the CPU
        results = {kind: analysis.describe(tvs, **p["analysis"]) for kind, (_, tvs) in sets.items()}
    tasks = {kind: names for kind, (names, _) in sets.items()}
    pairwise = {k: r for k, r in results.items() if "redundancy" in r}
    if not pairwise:
        common.log.warning("%s: %s; writing norms and spectra only", args.setup,
                           analysis.PAIRWISE_NOTE)  # fmt: skip
    cosine_outputs(pairwise, tasks, args.plots_dir, args.setup)
    layer_outputs(pairwise, args.plots_dir, args.setup)
    spectra_outputs(results, args.plots_dir, args.setup)
    redundancy_outputs(pairwise, p["analysis"]["topk"], args.plots_dir, args.setup)
    common.write_json(args.out, {k: scalars(r, tasks[k]) for k, r in results.items()})
    common.log.info("analysed the %s task vectors of %s; wrote %s and %s", ", ".join(results),
                    args.setup, args.out, args.plots_dir)  # fmt: skip


if __name__ == "__main__":
    common.run(main)
