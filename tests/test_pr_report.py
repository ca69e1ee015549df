"""`make pr-report` (scripts/pr_report.py) with the real git and dvc CLIs in a temporary repo, and
the pull-request workflow that runs it (.github/workflows/pr-metrics.yaml)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts.pr_report import PlotChange, build_markdown, cap_table

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "pr-metrics.yaml"
DVC_YAML = """\
stages:
  train:
    cmd: python -c "print('the metrics below are written by hand')"
    params:
    - train.lr
    - train.seed
    metrics:
    - metrics.json:
        cache: false
    plots:
    - curve.csv:
        cache: false
plots:
- figure.png
"""


def run(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    for key in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID"):
        env.pop(key, None)  # the local link, also when the suite runs in GitHub Actions
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def commit(repo: Path, message: str, tag: str, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(repo / name, mode) as f:
            f.write(content)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", message)
    run(repo, "git", "tag", tag)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """Three commits: `empty` (pipeline, no metrics yet), `base`, and HEAD with new results."""
    repo = tmp_path_factory.mktemp("pr")
    run(repo, "git", "init", "-q")
    run(repo, sys.executable, "-m", "dvc", "init", "-q")
    params = "train:\n  lr: {}\n  seed: 0\n"
    commit(repo, "pipeline", "empty", {"dvc.yaml": DVC_YAML, "params.yaml": params.format(0.1)})
    commit(repo, "first results", "base", {
        "metrics.json": '{"acc": 0.5, "loss": 1.25}', "curve.csv": "lam,acc\n0.1,0.4\n0.3,0.5\n",
        "figure.png": b"\x89PNG base"})  # fmt: skip
    commit(repo, "lower lr", "head", {
        "params.yaml": params.format(0.05), "metrics.json": '{"acc": 0.75, "loss": 1.25}',
        "curve.csv": "lam,acc\n0.1,0.4\n0.3,0.75\n", "figure.png": b"\x89PNG head"})  # fmt: skip
    return repo


def report(repo: Path, base: str) -> tuple[subprocess.CompletedProcess, str]:
    result = run(repo, sys.executable, "-m", "scripts.pr_report", "--base", base, check=False)
    return result, (repo / "reports" / "pr.md").read_text()


def cells(markdown: str, first: str) -> list[str]:
    """The cells of the table row whose first cells start with `first`."""
    for line in markdown.splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and " | ".join(row).startswith(first):
            return row
    raise AssertionError(f"no row starting with {first!r} in:\n{markdown}")


def test_report_shows_changed_metrics_params_and_plots(repo):
    result, markdown = report(repo, "base")
    assert result.returncode == 0, result.stderr
    assert cells(markdown, "metrics.json | acc") == ["metrics.json", "acc", "0.5", "0.75", "0.25"]
    assert cells(markdown, "params.yaml | train.lr") == ["params.yaml", "train.lr", "0.1", "0.05"]
    assert "loss" not in markdown and "train.seed" not in markdown  # unchanged: not listed
    assert cells(markdown, "`curve.csv`") == ["`curve.csv`", "changed", "2 -> 2"]
    assert cells(markdown, "`figure.png`") == ["`figure.png`", "changed", "1 -> 1"]
    images = [line for line in markdown.splitlines() if line.startswith("`figure.png`:")]
    assert images == ["`figure.png`: base ![base](pr_plots/base_figure.png) "
                      "workspace ![workspace](pr_plots/workspace_figure.png)"]  # fmt: skip
    assert (repo / "reports" / "pr_plots" / "base_figure.png").read_bytes() == b"\x89PNG base"
    assert "[pr_plots/index.html](pr_plots/index.html)" in markdown
    page = (repo / "reports" / "pr_plots" / "index.html").read_text()
    assert "vegaEmbed" in page and "cdn.jsdelivr" not in page  # the offline template
    assert sorted(p.name for p in (repo / "reports").iterdir()) == ["pr.md", "pr_plots"]


def test_same_revision_reports_no_change(repo):
    result, markdown = report(repo, "head")
    assert result.returncode == 0, result.stderr
    assert "No metric changed (2 compared)." in markdown
    assert "No param changed." in markdown and "No plot data changed." in markdown


def test_unknown_revision_says_which_and_writes_a_no_baseline_report(repo):
    result, markdown = report(repo, "no-such-branch")
    assert result.returncode == 1
    assert "pr-report: no baseline: revision 'no-such-branch' not found" in result.stderr
    assert "**No baseline: revision 'no-such-branch' not found.**" in markdown
    assert "### Metrics" not in markdown


def test_base_without_metrics_says_so_and_still_diffs_params(repo):
    result, markdown = report(repo, "empty")
    assert result.returncode == 0, result.stderr
    assert "pr-report: no baseline: empty has no metrics" in result.stderr
    assert "**No baseline: empty has no metrics.**" in markdown
    assert cells(markdown, "params.yaml | train.lr") == ["params.yaml", "train.lr", "0.1", "0.05"]
    assert "### Metrics" not in markdown


def test_long_tables_are_capped_with_a_count():
    table = "| a | b |\n|---|---|\n" + "".join(f"| {i} | x |\n" for i in range(10))
    capped = cap_table(table, max_rows=3)
    assert capped.splitlines()[:5] == [
        "| a | b |",
        "|---|---|",
        "| 0 | x |",
        "| 1 | x |",
        "| 2 | x |",
    ]
    assert "_7 more rows" in capped and "| 3 | x |" not in capped
    assert cap_table(table, max_rows=10) == table.strip()


def test_markdown_lists_new_and_removed_plots():
    plots = [PlotChange("plots/a.csv", "new", 0, 4), PlotChange("plots/b.csv", "removed", 3, 0)]
    markdown = build_markdown("main", "0123456789", "abc", metrics_md="", n_metrics=5, plots=plots)
    assert "vs `main` (`01234567`)" in markdown
    assert "No metric changed (5 compared)." in markdown
    assert "| `plots/a.csv` | new | 0 -> 4 |" in markdown
    assert "| `plots/b.csv` | removed | 3 -> 0 |" in markdown


def test_workflow_runs_the_readme_commands_and_comments_with_cml():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert "pull_request" in triggers
    assert workflow["permissions"]["pull-requests"] == "write"
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(python["with"]["python-version"]) == "3.11"
    report_steps = [s for s in steps if "GITHUB_STEP_SUMMARY" not in s.get("run", "")]  # forks
    commands = [line.strip() for s in report_steps for line in s.get("run", "").splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    allowed = [  # in this order: venv, dvc.yaml check, pull when a remote exists, repro, report
        "make .venv/bin/mergeloom",
        ".venv/bin/python -m stages.pipeline --check",
        'if [ -n "$(.venv/bin/dvc remote list)" ]; then',
        ".venv/bin/dvc pull --run-cache --allow-missing",
        "fi",
        "make repro",
        "make pr-report BASE=origin/${{ github.base_ref }}",
        "cml comment update --target=pr ",
    ]
    assert all(c.startswith(tuple(allowed)) for c in commands), commands
    assert [next(a for a in allowed if c.startswith(a)) for c in commands] == allowed
    comment = next(c for c in commands if c.startswith("cml comment"))
    assert comment.endswith("reports/pr.md")
    env = next(s for s in steps if "cml comment" in s.get("run", ""))["env"]
    assert env["REPO_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
