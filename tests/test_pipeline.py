"""The real `dvc` CLI on the real pipeline, in a temporary git repo, with a reduced params file
(tests/fixtures/params_small.yaml: same stages and code, fewer tasks and steps).

One full repro is shared by the tests of this module (module-scoped fixture); each test then
changes one thing and checks what DVC reruns, and puts it back.
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
COPIED = ["mergeloom", "stages", "configs", ".dvcignore", ".gitignore", "pyproject.toml"]
ENV = {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
       "MERGELOOM_DEVICE": "cpu", "MERGELOOM_NUM_WORKERS": "0"}  # fmt: skip


def run(repo: Path, *args: str, check: bool = True, env: dict | None = None) -> str:
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **ENV,
            **(env or {})}  # fmt: skip
    result = subprocess.run(args, cwd=repo, env=full, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def dvc(repo: Path, *args: str, check: bool = True, env: dict | None = None) -> str:
    return run(repo, sys.executable, "-m", "dvc", *args, check=check, env=env)


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def changed(repo: Path) -> set[str]:
    """Stages `dvc status` reports as changed."""
    status = dvc(repo, "status")
    return {line.rstrip(":").strip() for line in status.splitlines()
            if line and not line.startswith("\t") and line.rstrip().endswith(":")}  # fmt: skip


def set_param(repo: Path, dotted: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_code(repo: Path) -> None:
    for name in COPIED:
        source, target = ROOT / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)


def small_repo(repo: Path) -> Path:
    """A git repo with DVC, the code, the small params and their dvc.yaml, committed (dvclive
    and `dvc exp` need a commit)."""
    copy_code(repo)
    shutil.copy(SMALL, repo / "params.yaml")
    run(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    run(repo, sys.executable, "-m", "stages.pipeline")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "code and params")
    return repo


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """A temporary git repo where the small pipeline was reproduced once, and dvc's output."""
    repo = small_repo(tmp_path_factory.mktemp("pipeline"))
    first = dvc(repo, "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "small pipeline")
    return repo, first


@pytest.fixture
def repo(built) -> Path:
    """The built repo; afterwards params.yaml is restored and so are the outputs (run-cache)."""
    yield built[0]
    run(built[0], "git", "checkout", "params.yaml")
    dvc(built[0], "repro")


def test_full_repro_runs_every_stage_and_writes_metrics(built):
    repo, first = built
    stages = ran(first)
    assert {"check", "data", "pretrain", "heads", "task_vectors", "baselines", "report",
            "finetune_multitask@digits", "finetune_multitask@rotated", "finetune_continual@split0",
            "finetune_continual@split1", "finetune_domains@rotated",
            "finetune_sequential@split0", "finetune_sequential@split1", "finetune_domains@plain",
            "merge@weight_averaging", "merge@task_arithmetic", "merge@ties",
            "weave@task_arithmetic", "weave@ties",
            "analyze@multitask", "analyze@continual", "analyze@domains"} == stages  # fmt: skip
    analysis = json.loads((repo / "metrics/analysis/continual.json").read_text())
    assert set(analysis) == {"individual", "sequential", "sequential_increments"}
    for name in ("cosine", "layers", "spectra", "redundancy"):
        assert (repo / f"plots/analysis/continual/{name}.png").read_bytes()[:4] == b"\x89PNG"
    merged = json.loads((repo / "metrics/merge/ties.json").read_text())
    assert set(merged) == {"multitask", "continual", "continual_sequential", "domains"}
    assert merged["multitask"]["all"]["oracle_lam"] in (0.5, 1.0)
    assert set(merged["domains"]) == {"plain", "rotated"}  # one problem per held-out domain
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert set(summary) == {"multitask", "continual", "continual_sequential", "domains"}
    for unit, rows in summary.items():
        rows.pop("per-set optimal lambda IQR")
        assert {"zero-shot", "individual experts", "ties", "ties + weave (mean)",
                "ties @ oracle lambda"} <= set(rows), unit  # fmt: skip
        assert all(0 <= row["absolute"] <= 1 for row in rows.values()), unit
    assert "## multitask" in (repo / "reports/summary.md").read_text()
    headline = json.loads((repo / "metrics/headline.json").read_text())
    assert set(headline) == set(summary)
    assert set(headline["multitask"]["ties"]) == {"default", "weave_mean"}
    shown = dvc(repo, "metrics", "show")  # the headline only: the details are plain outputs
    assert "multitask.ties.weave_mean" in shown and "best_lambdas" not in shown, shown
    assert "up to date" in dvc(repo, "status")


def test_a_method_hyperparameter_reruns_that_method_and_the_report_only(repo):
    set_param(repo, "merge.methods.ties.k", 0.1)
    # `check` validates every params change first; its stamp never changes, so nothing more
    assert changed(repo) == {"check", "merge@ties", "weave@ties", "report"}
    assert ran(dvc(repo, "repro")) == {"check", "merge@ties", "weave@ties", "report"}


def test_pools_rerun_weaving_only_and_the_run_cache_restores_every_stage(repo):
    set_param(repo, "weave.pools", ["random"])
    rerun = {"check", "weave@task_arithmetic", "weave@ties", "report"}
    assert changed(repo) == rerun
    assert ran(dvc(repo, "repro")) == rerun
    run(repo, "git", "checkout", "params.yaml")
    back = dvc(repo, "repro")  # only the check runs: it is never restored, it checks
    assert ran(back) == {"check"} and "is cached - skipping run" in back, back
    set_param(repo, "weave.pools", ["random"])
    again = dvc(repo, "repro")  # the metrics and details come back from the run-cache too
    assert ran(again) == {"check"}, again
    woven = json.loads((repo / "metrics/weave/ties.json").read_text())
    assert set(woven["multitask"]["all"]) == {"random"}
    run(repo, "git", "checkout", "params.yaml")
    assert ran(dvc(repo, "repro")) == {"check"}


def test_a_new_method_adds_its_stage_and_reruns_only_the_report(repo):
    before = (repo / "metrics/summary.json").read_text()
    set_param(repo, "merge.methods.magmax", {"lam": 0.5})
    assert ran(dvc(repo, "repro")) == {"check", "merge@magmax", "report"}
    sweep = json.loads((repo / "metrics/merge/magmax.json").read_text())["multitask"]["all"]
    assert set(sweep["curves"]) == {"0.5", "1"}
    assert "magmax" in json.loads((repo / "metrics/summary.json").read_text())["multitask"]
    run(repo, "git", "checkout", "params.yaml")
    # DVC leaves the removed stage's metrics/merge/magmax.json behind; the report's input folder
    # differs from the first run, so the report reruns (reading methods by name: same bytes).
    assert ran(dvc(repo, "repro")) == {"check", "report"}
    assert (repo / "metrics/summary.json").read_text() == before
    (repo / "metrics/merge/magmax.json").unlink()
    (repo / "plots/sweep/magmax.csv").unlink()
    # DVC listed the cached magmax.json in metrics/merge/.gitignore, part of the folder's hash
    run(repo, "git", "checkout", "metrics/merge/.gitignore")


def test_runtime_settings_rerun_nothing(repo):
    env = {"MERGELOOM_DEVICE": "auto", "MERGELOOM_EVAL_BATCH_SIZE": "7",
           "MERGELOOM_NUM_WORKERS": "1", "MERGELOOM_DATASETS": str(repo / "elsewhere")}  # fmt: skip
    assert "up to date" in dvc(repo, "status", env=env)
    assert ran(dvc(repo, "repro", env=env)) == set()


def test_editing_merge_code_never_invalidates_fine_tuning(repo):
    methods = repo / "mergeloom" / "methods.py"
    original = methods.read_text()
    methods.write_text(original + "\n# an edit\n")
    try:
        stale = changed(repo)
    finally:
        methods.write_text(original)
    assert "merge@ties" in stale and "weave@ties" in stale, stale
    assert all(s.startswith(("merge@", "weave@")) or s == "check" for s in stale), stale


def test_deleted_outputs_are_restored_from_cache_without_recomputing(repo):
    expert = repo / "models/experts/multitask/digits.safetensors"
    before = expert.read_bytes()
    for folder in ("data", "models", "logs", "reports"):  # every cached output
        shutil.rmtree(repo / folder)
    output = dvc(repo, "repro")
    assert ran(output) == {"check"}, output  # its stamp was in reports/; it checks again
    assert "is cached - skipping run, checking out outputs" in output
    assert expert.read_bytes() == before


def test_forced_reruns_of_pretraining_and_fine_tuning_are_bit_identical(repo):
    files = [repo / "models/pretrained.safetensors",
             repo / "models/experts/continual_sequential/split1.safetensors"]  # fmt: skip
    before = [f.read_bytes() for f in files]
    for stage in ("pretrain", "finetune_sequential@split1"):
        assert ran(dvc(repo, "repro", "-f", "-s", stage)) == {stage}
    assert [f.read_bytes() for f in files] == before


def stage_command(repo: Path, stage: str) -> list[str]:
    """The stage's command from dvc.yaml, run directly (DVC would first delete its outputs)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    group, _, item = stage.partition("@")
    cmd = stages[group].get("do", stages[group])["cmd"]
    cmd = cmd.replace("${item}", item).replace("${key}", item)
    return [sys.executable, *cmd.split()[1:]]


def test_a_stale_pipeline_shape_fails_with_a_hint(repo):
    set_param(repo, "setups.continual.n_tasks", 3)
    output = run(repo, *stage_command(repo, "task_vectors"), check=False)
    assert "dvc.yaml is out of date with params.yaml" in output and "make pipeline" in output


@pytest.mark.parametrize(
    ("key", "value", "stage", "message"),
    [
        ("finetune.steps", 0, "finetune_multitask@digits",
         "params.yaml: finetune.steps = 0 is invalid; expected an integer >= 1"),
        ("setups.multitask.tasks", [], "data", "params.yaml: setups.multitask.tasks = [] is"),
        ("merge.methods", {"ties": {"densty": 0.2}}, "merge@ties",
         "merge.methods.ties: got an unexpected keyword argument 'densty'"),
        ("pretrain.lr", "fast", "pretrain", "params.yaml: pretrain.lr = 'fast' is invalid"),
        ("analysis.topk", [1.5], "analyze@continual",
         "params.yaml: analysis.topk = [1.5] is invalid; expected a non-empty list in (0, 1)"),
    ],
)  # fmt: skip
def test_bad_params_fail_before_any_work(repo, key, value, stage, message):
    expert = repo / "models/experts/multitask/digits.safetensors"
    before = expert.stat().st_mtime_ns
    set_param(repo, key, value)
    output = run(repo, *stage_command(repo, stage), check=False)
    assert message in output, output
    assert "Traceback" not in output  # a clear one-line error, not a crash
    assert expert.stat().st_mtime_ns == before


KEPT = [
    "metrics/merge/ties.json",
    "metrics/summary.json",
    "metrics/baselines.json",
    "data/multitask/digits.safetensors",
    "models/pretrained.safetensors",
    "dvc.lock",
]


def snapshot(repo: Path) -> dict[str, bytes]:
    return {name: (repo / name).read_bytes() for name in KEPT}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("merge.methods.ties.k", 0, "merge.methods.ties: k must be in (0.0, 1.0], got 0"),
        ("sweep.lambdas", [0.5, -1.0], "sweep.lambdas: -1.0 is invalid"),
        ("weave.lambdas", [1.0e39], "weave.lambdas: 1e+39 is invalid"),
        ("weave.methods", [], "weave.methods = [] is invalid"),
        ("finetune.learning_rate", 0.001, "unknown key finetune.learning_rate"),
        ("evaluation", {"batch_size": 8}, "unknown section 'evaluation'"),
    ],
)  # fmt: skip
def test_dvc_repro_checks_params_before_deleting_any_output(repo, key, value, message):
    """DVC deletes a stage's outputs before running it: the check stage runs first and fails,
    so a bad value leaves every output, git-tracked metrics included, and dvc.lock as they were."""
    before = snapshot(repo)
    set_param(repo, key, value)
    result = dvc(repo, "repro", check=False)
    assert ran(result) == {"check"}, result
    assert message in result and "Traceback" not in result, result
    assert snapshot(repo) == before


def test_a_datasets_root_inside_an_output_is_refused_and_kept(repo):
    """MERGELOOM_DATASETS inside `data/`: the check stage (params changed) and every stage that
    reads datasets refuse it, and the user's files survive."""
    user = repo / "data" / "user_datasets"
    user.mkdir()
    (user / "cars.txt").write_text("a dataset whose upstream link is dead")
    env = {"MERGELOOM_DATASETS": str(user)}
    try:
        set_param(repo, "merge.methods.ties.k", 0.1)
        result = dvc(repo, "repro", check=False, env=env)
        assert ran(result) == {"check"} and "overlaps the DVC output data" in result, result
        result = dvc(repo, "repro", "-s", "-f", "heads", check=False, env=env)
        assert "MERGELOOM_DATASETS" in result and "overlaps the DVC output data" in result
        assert (user / "cars.txt").read_text() == "a dataset whose upstream link is dead"
    finally:
        shutil.rmtree(user)


def test_a_remote_lets_a_second_clone_rerun_nothing(built, tmp_path):
    """README "Sharing results": `dvc push` to a shared folder from one clone; another clone
    that runs `dvc pull` is up to date, `dvc repro` runs no stage, its `dvc.lock` is the
    committed one and its models are the same bytes. (Earlier tests of this module rerun stages
    in the first clone, so its workspace is compared by its committed state.)"""
    repo, remote, clone = built[0], tmp_path / "remote", tmp_path / "clone"
    dvc(repo, "remote", "add", "--local", "--default", "shared", str(remote))
    try:
        dvc(repo, "push", "--all-commits", "--run-cache")
    finally:
        dvc(repo, "remote", "remove", "--local", "shared")
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    dvc(clone, "remote", "add", "--local", "--default", "shared", str(remote))
    dvc(clone, "pull")
    assert "up to date" in dvc(clone, "status")
    output = dvc(clone, "repro")
    assert ran(output) == set(), output
    assert (clone / "dvc.lock").read_text() == run(repo, "git", "show", "HEAD:dvc.lock")
    for path in ("models/pretrained.safetensors", "models/experts/multitask/digits.safetensors",
                 "models/task_vectors"):  # fmt: skip
        original = repo / path
        files = sorted(original.rglob("*")) if original.is_dir() else [original]
        assert files, path
        for file in files:
            relative = file.relative_to(repo)
            assert file.is_dir() or (clone / relative).read_bytes() == file.read_bytes(), relative


def test_exp_run_over_a_task_list_needs_no_new_dvc_yaml(repo):
    """Last in this module: `dvc exp run` leaves its results in the workspace."""
    output = dvc(repo, "exp", "run", "-S", "setups.multitask.tasks=[digits,parity]", "-n", "two")
    stages = ran(output)
    assert "finetune_multitask@parity" in stages, output
    assert not any(s.startswith(("finetune_multitask@digits", "finetune_continual",
                                 "finetune_sequential", "finetune_domains", "pretrain"))
                   for s in stages), stages  # fmt: skip
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert "parity" in json.dumps(json.loads((repo / "metrics/baselines.json").read_text()))
    assert set(summary["multitask"]) >= {"zero-shot", "ties"}
    assert "two" in dvc(repo, "exp", "show", "--csv")
