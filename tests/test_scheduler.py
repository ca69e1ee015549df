"""`mergeloom repro`: the DVC stage graph on Dask workers (mergeloom/scheduler.py), with the real
`dvc` CLI in temporary git repos: small shell stages for the scheduling rules, the reduced
pipeline (tests/fixtures/params_small.yaml) for "the same bytes as a serial dvc repro".
"""

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dask.utils import parse_bytes
from distributed import Client
from test_pipeline import ENV, ROOT, dvc, run, small_repo

from mergeloom import scheduler
from mergeloom.cli import main

# a and b are independent (one second each), both joins them; seed.txt gives a and b a
# dependency, without which DVC never run-caches a stage
STAGES = {
    "a": {"cmd": 'sleep 1 && echo "gpu=$CUDA_VISIBLE_DEVICES omp=$OMP_WAIT_POLICY" > a.txt',
          "deps": ["seed.txt"], "outs": ["a.txt"]},
    "b": {"cmd": 'sleep 1 && echo "gpu=$CUDA_VISIBLE_DEVICES omp=$OMP_WAIT_POLICY" > b.txt',
          "deps": ["seed.txt"], "outs": ["b.txt"]},
    "both": {"cmd": "cat a.txt b.txt > both.txt", "deps": ["a.txt", "b.txt"],
             "outs": ["both.txt"]},
}  # fmt: skip
BROKEN = {
    "broken": {"cmd": "echo 'cannot read models/bad.safetensors' && exit 3", "deps": ["seed.txt"],
               "outs": ["broken.txt"]},
    "after_broken": {"cmd": "cat a.txt broken.txt > after.txt", "deps": ["a.txt", "broken.txt"],
                     "outs": ["after.txt"]},
}  # fmt: skip


def make_repo(path: Path, stages: dict) -> Path:
    path.mkdir()
    (path / "seed.txt").write_text("seed\n")
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    run(path, "git", "init", "-q")
    dvc(path, "init", "-q")
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-qm", "stages")
    return path


def lock_stages(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


@pytest.fixture(scope="module")
def client():
    """Two local workers pinned to the made-up GPUs 3 and 5 (CUDA_VISIBLE_DEVICES only)."""
    cluster, pinned, resources = scheduler.local_cluster(2, ["3", "5"])
    assert resources == {"GPU": 1} and sorted(pinned.values()) == ["3", "5"]
    with cluster, Client(cluster) as client:
        client.pinned = pinned
        yield client


@pytest.fixture
def in_repo(tmp_path, monkeypatch):
    """Runs the driver in-process in a new repo of the shell stages, with the tests' DVC env."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    repo = make_repo(tmp_path / "repo", STAGES)
    monkeypatch.chdir(repo)
    return repo


def test_independent_stages_run_at_once_each_on_its_own_gpu(client, in_repo):
    outcome = scheduler.reproduce(client, gpus=client.pinned, resources={"GPU": 1})
    assert outcome.ok and not outcome.restored and not outcome.up_to_date
    runs = {r.stage: r for r in outcome.ran}
    assert list(runs) in (["a", "b", "both"], ["b", "a", "both"])
    # one worker each, so side by side: each had its worker's GPU, never both
    assert {runs["a"].gpu, runs["b"].gpu} == {"3", "5"}
    # and OpenMP's idle threads sleep rather than spin (the other stage needs the cores)
    assert (in_repo / "a.txt").read_text() == f"gpu={runs['a'].gpu} omp=PASSIVE\n"
    # both wrote dvc.lock at about the same time: no entry lost, in the serial order
    assert list(lock_stages(in_repo)) == ["a", "b", "both"]
    assert "Data and pipelines are up to date" in dvc(in_repo, "status")


def test_a_folder_written_by_stages_side_by_side_hashes_as_after_a_serial_run(client, in_repo):
    # DVC lists each output in its folder's .gitignore when the stage ends; `join` reads the
    # folder, .gitignore included: the slow first stage ends last when they run side by side
    stages = {
        "slow": {"cmd": "sleep 2 && echo 1 > out/slow.txt", "deps": ["seed.txt"],
                 "outs": ["out/slow.txt"]},
        "quick": {"cmd": "echo 2 > out/quick.txt", "deps": ["seed.txt"],
                  "outs": ["out/quick.txt"]},
        "join": {"cmd": "ls out > joined.txt", "deps": ["out"], "outs": ["joined.txt"]},
    }  # fmt: skip
    serial = make_repo(in_repo.parent / "serial", stages)
    (serial / "out").mkdir()
    dvc(serial, "repro")
    (in_repo / "dvc.yaml").write_text((serial / "dvc.yaml").read_text())
    (in_repo / "out").mkdir()
    outcome = scheduler.reproduce(client, gpus=client.pinned, resources={"GPU": 1})
    assert [r.stage for r in outcome.ran] == ["quick", "slow", "join"]
    assert (in_repo / "out/.gitignore").read_text() == (serial / "out/.gitignore").read_text()
    assert (in_repo / "dvc.lock").read_bytes() == (serial / "dvc.lock").read_bytes()


def test_a_second_run_sends_no_stage_to_a_worker(client, in_repo):
    scheduler.reproduce(client, gpus=client.pinned, resources={"GPU": 1})
    lock = (in_repo / "dvc.lock").read_bytes()
    again = scheduler.reproduce(client, gpus=client.pinned, resources={"GPU": 1})
    assert again.ok and again.ran == [] and again.restored == []
    assert again.up_to_date == ["a", "b", "both"]
    assert (in_repo / "dvc.lock").read_bytes() == lock


def test_outputs_in_the_run_cache_are_restored_by_the_driver_not_a_worker(client, in_repo):
    scheduler.reproduce(client, gpus=client.pinned, resources={"GPU": 1})
    before = {name: (in_repo / name).read_bytes() for name in ("a.txt", "both.txt")}
    lock = (in_repo / "dvc.lock").read_bytes()
    for name in before:
        (in_repo / name).unlink()
    outcome = scheduler.reproduce(client, gpus=client.pinned, resources={"GPU": 1})
    assert outcome.ran == [] and outcome.restored == ["a", "both"], outcome
    assert outcome.up_to_date == ["b"]
    assert {name: (in_repo / name).read_bytes() for name in before} == before
    assert (in_repo / "dvc.lock").read_bytes() == lock


def repro_cli(repo: Path, *args: str) -> tuple[int, str]:
    """`mergeloom repro` as a user runs it: (exit status, stdout and stderr)."""
    env = {**os.environ, **ENV, "CUDA_VISIBLE_DEVICES": "as-given"}
    env.pop("OMP_WAIT_POLICY", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run([sys.executable, "-m", "mergeloom.cli", "repro", *args], cwd=repo,
                          env=env, capture_output=True, text=True)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_a_failing_stage_stops_its_dependants_and_the_others_finish(tmp_path):
    repo = make_repo(tmp_path / "repo", {**BROKEN, **STAGES})
    code, output = repro_cli(repo, "--jobs", "2")
    assert code == 1, output
    assert "stage 'broken' failed (exit " in output, output
    # the end of its log: the command's own output and DVC's error
    assert "cannot read models/bad.safetensors" in output and "exited with 3" in output
    assert "not run, as they depend on it: after_broken;" in output
    # the independent stages finished and were recorded; the failed one and its dependant not
    assert set(lock_stages(repo)) == {"a", "b", "both"}
    assert not (repo / "broken.txt").exists() and not (repo / "after.txt").exists()
    # CPU workers leave CUDA_VISIBLE_DEVICES as it was
    assert (repo / "both.txt").read_text() == "gpu=as-given omp=PASSIVE\n" * 2


def test_a_failure_reaches_every_stage_downstream_and_no_other():
    upstream = {"data": [], "expert@a": ["data"], "expert@b": ["data"], "merge": ["expert@a",
                "expert@b"], "report": ["merge", "expert@b"], "other": []}  # fmt: skip
    down = scheduler.dependants(upstream)
    assert down["expert@b"] == ["merge", "report"]
    assert sorted(scheduler.downstream_of("expert@a", down)) == ["merge", "report"]
    assert scheduler.downstream_of("other", down) == []


def test_worker_resources_are_read_from_the_worker_arguments():
    args = ["--lifetime", "1h", "--resources", "GPU=1 MEM=2e9"]
    assert scheduler.worker_resources(args) == {"GPU": 1.0, "MEM": 2e9}
    assert scheduler.worker_resources(["--nthreads", "1"]) == {}


def test_the_slurm_config_asks_for_what_it_says():
    path = ROOT / "configs/cluster/slurm.yaml"
    wanted = yaml.safe_load(path.read_text())["jobqueue"]["slurm"]
    cluster, resources = scheduler.jobqueue_cluster(path)  # builds the script, submits nothing
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert resources == {"GPU": 1}
    directives = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    gigabytes = math.ceil(parse_bytes(wanted["memory"]) / 2**30)
    assert {"#SBATCH --gres=gpu:1", f"#SBATCH -t {wanted['walltime']}",
            f"#SBATCH --cpus-per-task={wanted['cores']}", f"#SBATCH --mem={gigabytes}G",
            } <= directives, script  # fmt: skip
    assert "--resources GPU=1" in script  # one stage at a time on the job's GPU


def test_a_cluster_config_with_no_single_known_section_is_refused(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("jobqueue:\n  slurm: {cores: 1, memory: 1GB}\n  pbs: {cores: 1}\n")
    with pytest.raises(ValueError, match=r"found jobqueue sections \['slurm', 'pbs'\]; expected"):
        scheduler.jobqueue_cluster(config)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0,0"], "--gpus '0,0': expected distinct GPU ids"),
        (["--gpus", "0,1", "--jobs", "3"], "--jobs 3 with --gpus 0,1: one worker per GPU"),
        (["--jobs", "0"], "--jobs 0: expected a number of workers >= 1"),
    ],
)
def test_bad_repro_options_are_one_line_and_exit_2(args, message, capsys):
    assert main(["repro", *args]) == 2
    assert message in capsys.readouterr().err


def tree_digests(repo: Path, folders: tuple[str, ...]) -> dict[str, str]:
    return {str(path.relative_to(repo)): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted((repo / folder).rglob("*"))
            if path.is_file() and path.name != ".gitignore"}  # fmt: skip


@pytest.mark.slow
def test_two_workers_give_the_bytes_of_a_serial_dvc_repro(tmp_path):
    repos = {}
    for name in ("serial", "parallel"):
        repos[name] = small_repo(tmp_path / name)
    dvc(repos["serial"], "repro")
    code, output = repro_cli(repos["parallel"], "--jobs", "2")
    assert code == 0 and "0 restored from the run-cache, 0 up to date" in output, output
    serial, parallel = repos["serial"], repos["parallel"]
    assert (parallel / "dvc.lock").read_bytes() == (serial / "dvc.lock").read_bytes()
    folders = ("metrics", "models", "reports", "plots")
    digests = tree_digests(serial, folders)
    assert len(digests) > 40 and tree_digests(parallel, folders) == digests
    assert "up to date" in dvc(parallel, "status")
