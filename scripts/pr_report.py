"""Write reports/pr.md: the workspace's metrics, params and plots against a base revision.

    python -m scripts.pr_report --base main [--out reports/pr.md]     # or: make pr-report BASE=main

The tables are `dvc metrics diff <base> --md` and `dvc params diff <base> --md` verbatim (the
CLI's markdown is the documented, stable rendering; `dvc.repo.Repo` returns dicts only). Plots
come from `dvc plots diff <base> --json`: a plot is listed when its data differ between the two
revisions, and `dvc plots diff <base> -o reports/pr_plots` renders them as HTML next to the
report, through the offline page template of scripts/plots_html.py (no CDN). A base that is
not a revision, or has no metrics, gives a report that says "no baseline" and a one-line message
on stderr (exit 1 when the revision is unknown or dvc fails, 0 when the base has no metrics: a
first pull request that adds them).
The report is written to a temporary file and renamed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scripts import plots_html

MAX_TABLE_ROWS = 150  # a GitHub comment holds 65,536 characters; the report counts cut rows
PLOTS_DIR = "pr_plots"  # next to the report


@dataclass(frozen=True)
class PlotChange:
    """One plot definition whose data differ between the base and the workspace."""

    name: str
    status: str  # "changed", "new" or "removed"
    base_rows: int  # data rows, or images
    rows: int
    images: tuple[tuple[str, str], ...] = ()  # (revision, file) of an image plot


def has_rows(table: str) -> bool:
    """Whether a markdown table has rows (dvc prints a bare header when nothing changed)."""
    return sum(1 for line in table.splitlines() if line.lstrip().startswith("|")) > 2


def cap_table(table: str, max_rows: int = MAX_TABLE_ROWS) -> str:
    """Keep a markdown table's header and first `max_rows` rows, saying how many were left out."""
    lines = [line for line in table.strip().splitlines() if line.strip()]
    header, rows = lines[:2], lines[2:]
    if len(rows) <= max_rows:
        return "\n".join(lines)
    left = len(rows) - max_rows
    return "\n".join(header + rows[:max_rows]) + f"\n\n_{left} more rows: run the command above._"


def build_markdown(
    base: str,
    base_sha: str | None,
    head: str,
    *,
    problem: str | None = None,
    metrics_md: str = "",
    n_metrics: int = 0,
    params_md: str = "",
    plots: list[PlotChange] | None = None,
    plots_html: str | None = None,
    plots_error: str | None = None,
    warnings: list[str] | None = None,
) -> str:
    """The report. `problem` set (e.g. "revision X not found") means there is no baseline."""
    title = f"`{base}`" + (f" (`{base_sha[:8]}`)" if base_sha else "")
    out = [f"## Metrics and params: workspace `{head}` vs {title}", ""]
    if problem is not None:
        out += [f"**No baseline: {problem}.** Nothing to compare the metrics against.", ""]
    for warning in warnings or []:
        out += [f"> {warning}", ""]
    if problem is None:
        out += ["### Metrics", "", f"`dvc metrics diff {base} --md` (changed values only):", ""]
        if has_rows(metrics_md):
            out += [cap_table(metrics_md), ""]
        else:
            out += [f"No metric changed ({n_metrics} compared).", ""]
    if base_sha is not None:
        out += ["### Params", "", f"`dvc params diff {base} --md`:", ""]
        out += [cap_table(params_md) if has_rows(params_md) else "No param changed.", ""]
    if problem is None:
        out += ["### Plots", ""]
        if plots_error:
            out += [f"Could not compare plots: {plots_error}", ""]
        elif not plots:
            out += ["No plot data changed.", ""]
        else:
            out += ["| plot | status | rows (base -> workspace) |", "|---|---|---|"]
            out += [f"| `{p.name}` | {p.status} | {p.base_rows} -> {p.rows} |" for p in plots]
            out += [""]
            for p in plots:  # image plots: shown inline (CML uploads local images)
                if p.images:
                    shown = " ".join(f"{rev} ![{rev}]({file})" for rev, file in p.images)
                    out += [f"`{p.name}`: {shown}"]
                    out += [""]
            if plots_html:
                out += [f"Rendered with `dvc plots diff {base}`: {plots_html}", ""]
    return "\n".join(out).rstrip() + "\n"


def old_values(metrics_json: dict) -> int:
    """How many metrics in `dvc metrics diff --all --json` output have a base value."""
    return sum(
        1 for metrics in metrics_json.values() for v in metrics.values() if v.get("old") is not None
    )


def plot_changes(plots_json: dict, base: str, report_dir: Path) -> list[PlotChange]:
    """Plots whose rows differ between `base` and the workspace, from `dvc plots diff --json`."""
    changes = []
    for name, renders in sorted(plots_json.get("data", {}).items()):
        rows: dict[str, list[dict]] = {base: [], "workspace": []}
        images = sorted(  # base first
            (
                (rev, os.path.relpath(r["url"], report_dir))
                for r in renders
                if r.get("type") == "image"
                for rev in r.get("revisions", [])
            ),
            key=lambda image: image[0] != base,
        )
        for render in renders:
            if render.get("type") == "vega":
                for row in render["content"].get("data", {}).get("values", []):
                    values = {k: v for k, v in row.items() if k not in ("rev", "step")}
                    rows.setdefault(row.get("rev"), []).append(values)
            else:  # an image: one entry per revision; compare the files' bytes
                for rev in render.get("revisions", []):
                    rows.setdefault(rev, []).append({"bytes": Path(render["url"]).read_bytes()})
        old, new = rows[base], rows["workspace"]
        if old == new:
            continue
        status = "new" if not old else "removed" if not new else "changed"
        changes.append(PlotChange(name, status, len(old), len(new), tuple(images)))
    return changes


def dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def collect(base: str, out_dir: Path) -> tuple[dict, str | None, int]:
    """Run git and dvc: build_markdown's keyword arguments, a message for stderr, an exit code."""
    head = git("rev-parse", "--short=8", "HEAD").stdout.strip() or "workspace"
    if git("status", "--porcelain", "--untracked-files=no").stdout.strip():
        head += " + uncommitted changes"
    sha = git("rev-parse", "--verify", "--quiet", f"{base}^{{commit}}").stdout.strip() or None
    kwargs: dict = {"base": base, "base_sha": sha, "head": head}
    if sha is None:
        problem = f"revision '{base}' not found"
        return {**kwargs, "problem": problem}, f"no baseline: {problem}", 1
    params = dvc("params", "diff", base, "--md")
    kwargs["params_md"] = params.stdout if params.returncode == 0 else ""
    metrics = dvc("metrics", "diff", base, "--all", "--json")
    if metrics.returncode != 0:
        problem = f"`dvc metrics diff {base}` failed: {last_line(metrics.stderr)}"
        return {**kwargs, "problem": problem}, f"no baseline: {problem}", 1
    values = json.loads(metrics.stdout or "{}")
    if old_values(values) == 0:
        problem = f"{base} has no metrics"
        return {**kwargs, "problem": problem}, f"no baseline: {problem}", 0
    kwargs["n_metrics"] = sum(len(v) for v in values.values())
    kwargs["metrics_md"] = dvc("metrics", "diff", base, "--md").stdout
    kwargs["warnings"] = [line for line in metrics.stderr.splitlines() if "failed" in line]
    plots_dir = out_dir / PLOTS_DIR  # ours alone: emptied so no stale plot survives
    shutil.rmtree(plots_dir, ignore_errors=True)
    plots_dir.mkdir(parents=True)
    plots = dvc("plots", "diff", base, "--json", "-o", str(plots_dir))
    try:
        kwargs["plots"] = plot_changes(json.loads(plots.stdout), base, out_dir)
    except (json.JSONDecodeError, KeyError, OSError) as error:
        kwargs["plots_error"] = last_line(plots.stderr) or repr(error)
    if kwargs.get("plots"):  # the offline page of `make plots-diff`: no CDN needed to view it
        template = plots_html.write_template(Path(".dvc") / "tmp")
        html = dvc("plots", "diff", base, "-o", str(plots_dir), "--html-template", str(template))
        kwargs["plots_html"] = plots_link() if html.returncode == 0 else last_line(html.stderr)
    return kwargs, None, 0


def plots_link() -> str:
    """Where a reader finds the HTML: the workflow run's artifact in CI, else the local file."""
    server, repo, run = (
        os.environ.get(k) for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")
    )
    if server and repo and run:
        url = f"{server}/{repo}/actions/runs/{run}"
        return f"`reports/{PLOTS_DIR}/index.html` in the `pr-report` artifact of [this run]({url})"
    return f"[{PLOTS_DIR}/index.html]({PLOTS_DIR}/index.html)"


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--out", type=Path, default=Path("reports/pr.md"))
    args = parser.parse_args(argv)
    kwargs, message, code = collect(args.base, args.out.parent)
    write_atomic(args.out, build_markdown(**kwargs))
    if message:
        print(f"pr-report: {message}", file=sys.stderr)
    print(f"pr-report: wrote {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
