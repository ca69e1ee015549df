"""The GitHub workflows say what the README promises: tests on every push and pull request, the
pull-request report checks dvc.yaml instead of rewriting it, no comment attempt from forks, CML
pinned."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
SAME_REPO = "github.event.pull_request.head.repo.full_name == github.repository"
FORK = "github.event.pull_request.head.repo.full_name != github.repository"


def workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(flow: dict) -> dict:
    return flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` key as True


def steps(flow: dict) -> list[dict]:
    (job,) = flow["jobs"].values()
    return job["steps"]


def step_running(flow: dict, command: str) -> tuple[int, dict]:
    found = [(i, s) for i, s in enumerate(steps(flow)) if command in s.get("run", "")]
    assert len(found) == 1, f"one step should run {command!r}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.y*ml")))
def test_every_workflow_parses_and_has_a_time_limit(name):
    flow = workflow(name)
    assert triggers(flow) and flow["permissions"]["contents"] == "read"
    assert all("timeout-minutes" in job for job in flow["jobs"].values())


def test_make_test_runs_on_every_push_and_pull_request_with_python_311():
    flow = workflow("test.yaml")
    assert {"push", "pull_request"} <= set(triggers(flow))
    step_running(flow, ".ci/run")
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    (setup,) = [s for s in steps(flow) if s.get("uses", "").startswith("actions/setup-python")]
    assert setup["with"] == {"python-version": "3.11", "cache": "pip",
                             "cache-dependency-path": "requirements.lock"}  # fmt: skip


def test_the_pull_request_report_checks_dvc_yaml_before_reproducing():
    flow = workflow("pr-metrics.yaml")
    check, _ = step_running(flow, ".venv/bin/python -m stages.pipeline --check")
    repro, _ = step_running(flow, "make repro")
    assert check < repro
    assert not [s for s in steps(flow) if "make pipeline" in s.get("run", "")]


def test_forks_get_a_summary_note_instead_of_a_comment_and_cml_is_pinned():
    flow = workflow("pr-metrics.yaml")
    _, comment = step_running(flow, "cml comment")
    assert SAME_REPO in comment["if"]
    _, note = step_running(flow, "GITHUB_STEP_SUMMARY")
    assert FORK in note["if"] and "fork" in note["run"]
    (cml,) = [s for s in steps(flow) if s.get("uses", "").startswith("iterative/setup-cml@")]
    assert re.fullmatch(r"v?\d+\.\d+\.\d+", str(cml["with"]["version"]))


def test_main_pushes_its_run_cache_and_pull_requests_pull_it_before_reproducing():
    """A pull request reruns only what it changed: main's outputs and run-cache are on the
    remote (share-cache.yaml), and the pull-request job pulls both before `make repro`."""
    share = workflow("share-cache.yaml")
    assert triggers(share) == {"push": {"branches": ["main"]}}
    repro, _ = step_running(share, "make repro")
    push, push_step = step_running(share, "dvc push --run-cache")
    assert repro < push and "configured == 'yes'" in push_step["if"]
    flow = workflow("pr-metrics.yaml")
    pull, _ = step_running(flow, "dvc pull --run-cache")
    repro, _ = step_running(flow, "make repro")
    assert pull < repro
