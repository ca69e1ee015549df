"""The real `dvc` CLI on the real pipeline, in a temporary git repo, with a reduced params file
(tests/fixtures/params_small.yaml: same stages and code, fewer tasks and steps).

One full repro is shared by the tests of this module (module-scoped fixture); each test then
changes one thing and checks what DVC reruns.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "tests" / "fixtures" / "params_small.yaml"
COPIED = ["mergeloom", "stages", "configs", ".dvcignore", "pyproject.toml"]


def run(repo: Path, *args: str, check: bool = True) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def dvc(repo: Path, *args: str, check: bool = True) -> str:
    return run(repo, sys.executable, "-m", "dvc", *args, check=check)


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def set_param(repo: Path, dotted: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """A temporary git repo where the small pipeline was reproduced once, and dvc's output."""
    repo = tmp_path_factory.mktemp("pipeline")
    for name in COPIED:
        source, target = ROOT / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    shutil.copy(SMALL, repo / "params.yaml")
    run(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    run(repo, sys.executable, "-m", "stages.pipeline")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "code and params")  # dvclive and `dvc exp` need a commit
    first = dvc(repo, "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "small pipeline")
    return repo, first


@pytest.fixture
def repo(built) -> Path:
    return built[0]


def test_full_repro_runs_every_stage_and_writes_metrics(built):
    repo, first = built
    stages = ran(first)
    assert {"data", "pretrain", "heads", "finetune_sequential", "task_vectors", "evaluate",
            "merge", "weave", "report"} <= stages  # fmt: skip
    assert "finetune@multitask-digits" in stages and "finetune@domains-rotated" in stages
    assert {"analyze@multitask", "analyze@continual", "analyze@domains"} <= stages
    analysis = json.loads((repo / "metrics/analysis/continual.json").read_text())
    assert set(analysis) == {"individual", "sequential", "sequential_increments"}
    for name in ("cosine", "layers", "spectra", "redundancy"):
        assert (repo / f"plots/analysis/continual/{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "analysis/continual.json" in dvc(repo, "metrics", "show")
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert set(summary) == {"multitask", "continual", "continual_sequential", "domains"}
    for unit, rows in summary.items():
        iqr = rows.pop("per-set optimal lambda IQR")
        assert set(iqr) == {"weight_averaging", "task_arithmetic", "ties"}, unit
        assert {"zero-shot", "individual experts", "ties", "ties + weave (mean)",
                "ties @ oracle lambda"} <= set(rows), unit  # fmt: skip
        assert all(0 <= row["absolute"] <= 1 for row in rows.values()), unit
    assert "up to date" in dvc(repo, "status")


def test_pool_change_reruns_only_weave_and_report(repo):
    set_param(repo, "weave.pools", ["random"])
    status = dvc(repo, "status")
    changed = {
        line.rstrip(":").strip()
        for line in status.splitlines()
        if line and not line.startswith("\t") and line.rstrip().endswith(":")
    }
    assert changed == {"weave"}, status
    assert ran(dvc(repo, "repro")) == {"weave", "report"}
    run(repo, "git", "checkout", "params.yaml")
    assert ran(dvc(repo, "repro")) <= {"weave", "report"}  # back: run-cache or rerun, nothing else


def test_analysis_change_reruns_only_the_analysis(repo):
    set_param(repo, "analysis.topk", [0.05])
    analyzed = {"analyze@multitask", "analyze@continual", "analyze@domains"}
    assert ran(dvc(repo, "repro")) == analyzed | {"report"}  # the summary quotes the analysis
    rows = (repo / "plots/analysis/multitask/redundancy.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("0.05,")
    run(repo, "git", "checkout", "params.yaml")
    dvc(repo, "repro")


def test_new_method_or_lambda_retrains_no_expert(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["merge"]["methods"]["magmax"] = {"lam": 0.5}
    params["sweep"]["lambdas"] = [*params["sweep"]["lambdas"], 2.0]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = ran(dvc(repo, "repro"))
    assert stages == {"merge", "weave", "report"}, stages
    sweep = json.loads((repo / "metrics/multitask/sweep.json").read_text())
    assert set(sweep["all"]["magmax"]["curves"]) == {"0.5", "1", "2"}
    run(repo, "git", "checkout", "params.yaml")
    dvc(repo, "repro")


def test_deleted_outputs_are_restored_from_cache_without_recomputing(repo):
    expert = repo / "models/experts/multitask/digits.safetensors"
    before = expert.read_bytes()
    for folder in ("data", "models", "logs"):  # every cached output
        shutil.rmtree(repo / folder)
    output = dvc(repo, "repro")
    assert ran(output) == set(), output
    assert "is cached - skipping run, checking out outputs" in output
    assert expert.read_bytes() == before


def stage_command(repo: Path, stage: str) -> list[str]:
    """The stage's command from dvc.yaml, run directly (DVC would first delete its outputs)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    if "@" in stage:
        group, item = stage.split("@")
        cmd, items = stages[group]["do"]["cmd"], stages[group]["foreach"]
        if isinstance(items, list):  # foreach over plain names
            cmd = cmd.replace("${item}", item)
        else:
            for key, value in items[item].items():
                cmd = cmd.replace(f"${{item.{key}}}", value)
    else:
        cmd = stages[stage]["cmd"]
    return [sys.executable, *cmd.split()[1:]]


def test_a_stale_dvc_yaml_fails_with_a_hint(repo):
    set_param(repo, "setups.multitask.tasks", ["digits", "parity"])
    output = run(repo, *stage_command(repo, "task_vectors"), check=False)
    assert "dvc.yaml is out of date with params.yaml: run `make pipeline`" in output
    run(repo, "git", "checkout", "params.yaml")


@pytest.mark.parametrize(
    ("key", "value", "stage", "message"),
    [
        ("finetune.steps", 0, "finetune@multitask-digits",
         "params.yaml: finetune.steps = 0 is invalid; expected an integer >= 1"),
        ("setups.multitask.tasks", ["digits", "sudoku"], "data",
         "params.yaml: setups.multitask.tasks = ['digits', 'sudoku'] is invalid; expected a list"),
        ("setups.multitask.tasks", [], "data", "params.yaml: setups.multitask.tasks = [] is"),
        ("weave.pools", ["median"], "weave", "params.yaml: weave.pools = ['median'] is invalid"),
        ("merge.methods", {"ties": {"densty": 0.2}}, "merge",
         "params.yaml: merge.methods.ties: got an unexpected keyword argument 'densty'"),
        ("pretrain.lr", "fast", "pretrain", "params.yaml: pretrain.lr = 'fast' is invalid"),
        ("analysis.topk", [1.5], "analyze@continual",
         "params.yaml: analysis.topk = [1.5] is invalid; expected a non-empty list in (0, 1)"),
    ],
)  # fmt: skip
def test_bad_params_fail_before_any_work(repo, key, value, stage, message):
    expert = repo / "models/experts/multitask/digits.safetensors"
    before = expert.stat().st_mtime_ns
    set_param(repo, key, value)
    try:
        output = run(repo, *stage_command(repo, stage), check=False)
    finally:
        run(repo, "git", "checkout", "params.yaml")
    assert message in output, output
    assert "Traceback" not in output  # a clear one-line error, not a crash
    assert expert.stat().st_mtime_ns == before


def test_exp_run_with_a_pool_override_shows_metrics(repo):
    output = dvc(repo, "exp", "run", "-S", "weave.pools=[random]", "-n", "pool-random")
    assert ran(output) == {"weave", "report"}, output
    table = dvc(repo, "exp", "show", "--csv")
    assert "pool-random" in table
    assert "multitask.ties + weave (random).absolute" in table
