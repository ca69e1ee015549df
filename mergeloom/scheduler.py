"""Run a DVC pipeline's independent stages at the same time, as Dask tasks (``mergeloom repro``).

`dvc repro` runs one stage at a time. Here the stage graph comes from DVC itself (the graph and
order that `dvc repro` would use) and every stage still runs through DVC, as
``dvc --wait-for-lock repro --single-item <stage>`` (DVC's documented manual parallelism): DVC's
repository lock serialises each read-modify-write of dvc.lock and its per-path read/write locks
keep stages that share outputs apart. This module only decides what may run now, and where.

A stage is sent to a worker only when its upstream stages have finished and DVC would really
run its command: the driver checks, in-process and under DVC's repository lock, whether the
stage is up to date (skipped) or restorable from the run-cache (restored by the driver, a
checkout that needs no worker). A failed stage stops its dependants only; DVC writes a stage's
dvc.lock entry only after its command succeeded, so a failure records nothing.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

DVC = (sys.executable, "-m", "dvc")
LOG_DIR = Path(".dvc") / "tmp" / "repro"  # one log per stage run on a worker (git-ignored)
TAIL_LINES = 20
JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
UP_TO_DATE, RESTORE, RUN = "up to date", "restore", "run"


@dataclass(frozen=True)
class StageRun:
    """One stage's run on a worker, as the worker saw it."""

    stage: str
    returncode: int
    seconds: float
    log: str
    worker: str = ""
    gpu: str | None = None  # CUDA_VISIBLE_DEVICES given to the stage, None when left alone


@dataclass
class Outcome:
    """What happened to every stage of the plan."""

    ran: list[StageRun] = field(default_factory=list)  # on a worker, successfully
    restored: list[str] = field(default_factory=list)  # from the run-cache, by the driver
    up_to_date: list[str] = field(default_factory=list)
    failed: list[StageRun] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)  # dependant -> the failed stage

    @property
    def ok(self) -> bool:
        return not self.failed


# --- the stage graph, from DVC --------------------------------------------------------------


def open_repo() -> Any:
    """The DVC repo around the current folder, as the `dvc` CLI finds it, with a repository
    lock that waits (as `dvc --wait-for-lock`) instead of failing after 3 s."""
    from dvc.repo import Repo

    return Repo(_wait_for_lock=True)


def plan(repo: Any, targets: Sequence[str] = ()) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """({stage: the stages it depends on}, {stage: DVC's Stage}), in the order a serial
    `dvc repro` would run them.

    The same calls as `dvc repro [targets]` (dvc/repo/reproduce.py): the stages of the targets
    (default: ./dvc.yaml) and everything upstream, frozen stages cut from their dependencies.
    """
    from dvc.repo import lock_repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with lock_repo(repo):
        stages = collect_stages(repo, list(targets) or [os.path.abspath("dvc.yaml")])
        graph = get_active_graph(repo.index.graph)
        order = plan_repro(graph, stages)
        names = {stage: stage.addressing for stage in order}
        # DVC's edges point from a stage to the stages it depends on
        upstream = {names[s]: [names[u] for u in graph.successors(s) if u in names] for s in order}
        return upstream, {name: stage for stage, name in names.items()}


def dependants(upstream: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The graph turned round: {stage: the stages that depend on it}."""
    down: dict[str, list[str]] = {name: [] for name in upstream}
    for name, ups in upstream.items():
        for up in ups:
            down[up].append(name)
    return down


def downstream_of(stage: str, down: Mapping[str, Sequence[str]]) -> list[str]:
    """Every stage that depends on ``stage``, directly or not."""
    seen: dict[str, None] = {}
    todo = list(down[stage])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen[name] = None
            todo.extend(down[name])
    return list(seen)


def classify(repo: Any, stage: Any) -> str:
    """UP_TO_DATE, RESTORE (the run-cache has its outputs) or RUN, as `dvc repro` would decide.

    ``stage`` comes from the index loaded at the start: its dvc.lock entry changes only when it
    runs, after this, so the lock file (slow to parse when large) is not read again per stage.
    The restore test mirrors ``StageCache.restore`` (dvc/stage/cache.py) without checking
    anything out: its own dry run cannot be used, it keys the run-cache on the dependency
    hashes recorded in dvc.lock, not on the files as they are now.
    """
    with repo.lock:  # waits; and unlike lock_repo, keeps the loaded index
        if not stage.changed():
            return UP_TO_DATE
        return RESTORE if _restorable(repo, stage) else RUN


def _restorable(repo: Any, stage: Any) -> bool:
    from dvc.stage.cache import _can_hash

    if stage.is_callback or stage.always_changed or not _can_hash(stage):
        return False  # persist outputs, no deps or no outs: never run-cached
    cache = repo.stage_cache
    if not (
        not stage.changed_stage()
        and stage.deps_cached()
        and all(out.hash_info for out in stage.outs)
    ):
        stage.save_deps()  # the run-cache key is the dependencies as they are now
        entry = cache._load(stage)
        if not entry:
            return False
        stage = cache._create_stage(entry, wdir=stage.wdir)
    return stage.outs_cached()


def restore(repo: Any, name: str) -> None:
    """DVC's own single-stage repro, in-process: a run-cache checkout plus its dvc.lock entry."""
    repo.reproduce(name, single_item=True)


def keep_serial_lock_order(repo: Any, order: Sequence[str], before: Mapping[str, set[str]]):
    """Put the dvc.lock entries this run added in the serial order, so dvc.lock's bytes are the
    same as after `dvc repro`: DVC appends a new entry when its stage finishes, and stages finish
    in a different order when they run side by side. Entries that were there stay where they were.
    """
    from dvc.repo import lock_repo
    from dvc.utils.serialize import modify_yaml

    with lock_repo(repo):
        for lock_path, names in _lock_files(repo, order).items():
            if not os.path.exists(lock_path):
                continue
            with modify_yaml(lock_path) as data:
                stages = data.get("stages", {})
                for name in names:
                    if name in stages and name not in before.get(lock_path, set()):
                        stages[name] = stages.pop(name)  # to the end, in plan order


def ignore_entries(stages: Mapping[str, Any]) -> dict[str, dict[str, list[str]]]:
    """{stage: {.gitignore path: the entries DVC adds there for the stage's outputs}}."""
    found: dict[str, dict[str, list[str]]] = {}
    for name, stage in stages.items():
        for out in stage.outs:
            path = Path(out.fs_path)
            found.setdefault(name, {}).setdefault(str(path.parent / ".gitignore"), []).append(
                "/" + path.name
            )
    return found


def keep_serial_ignore_order(files: Sequence[str], rank: Mapping[str, int], before: Mapping):
    """Put the .gitignore lines this run added in the serial order. DVC appends a line when a
    stage's output is committed, so finishing order shows in the file, and a stage that reads
    the folder (a directory dependency) would hash a different .gitignore than after `dvc repro`.
    Called before a stage's dependants start; lines there before the run stay first."""
    for file in files:
        path = Path(file)
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        old = [line for line in lines if line in before.get(file, set())]
        new = [line for line in lines if line not in before.get(file, set())]
        ordered = old + sorted(new, key=lambda line: rank.get(f"{file}\n{line}", len(rank)))
        if ordered != lines:
            path.write_text("".join(line + "\n" for line in ordered))


def lock_entries(repo: Any, order: Sequence[str]) -> dict[str, set[str]]:
    """{dvc.lock path: the stage names it records}, for the lock files of the plan's stages."""
    out = {}
    for lock_path in _lock_files(repo, order):
        data = yaml.safe_load(Path(lock_path).read_text()) if os.path.exists(lock_path) else None
        out[lock_path] = set((data or {}).get("stages", {}))
    return out


def _lock_files(repo: Any, order: Sequence[str]) -> dict[str, list[str]]:
    """{dvc.lock path: the names of the plan's stages recorded there, in plan order}."""
    files: dict[str, list[str]] = {}
    for address in order:
        path, _, name = address.rpartition(":")
        dvcfile = os.path.abspath(path or "dvc.yaml")
        if dvcfile.endswith((".yaml", ".yml")):
            files.setdefault(str(Path(dvcfile).with_name("dvc.lock")), []).append(name)
    return files


# --- one stage, on a worker -----------------------------------------------------------------


def run_stage(stage: str, cwd: str, log_path: str, gpus: Mapping[str, str]) -> StageRun:
    """``dvc --wait-for-lock repro --single-item stage`` in ``cwd``, output to ``log_path``,
    with OpenMP's idle threads sleeping (``OMP_WAIT_POLICY=PASSIVE``).

    ``gpus`` maps a worker name to the CUDA_VISIBLE_DEVICES of its stages (one GPU per local
    worker); a worker not in it (CPU, or a cluster job that SLURM already pinned) leaves it alone.
    """
    from distributed import get_worker

    worker = str(get_worker().name)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # stages side by side oversubscribe the cores (each torch uses all of them); OpenMP's
    # default busy-waiting then burns the CPU the other stage needs. Idle threads sleep
    # instead: no change to the thread count, so none to the results (unless set already)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    gpu = gpus.get(worker)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as out:
        done = subprocess.run(
            [*DVC, "--wait-for-lock", "repro", "--single-item", stage],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return StageRun(stage, done.returncode, time.monotonic() - start, log_path, worker, gpu)


def log_tail(path: str, lines: int = TAIL_LINES) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"(no log: {err.strerror})"


# --- the driver -----------------------------------------------------------------------------


def reproduce(
    client: Any,
    targets: Sequence[str] = (),
    *,
    gpus: Mapping[str, str] | None = None,
    resources: Mapping[str, float] | None = None,
) -> Outcome:
    """Reproduce ``targets`` (default ./dvc.yaml) on ``client``'s workers, in the current folder.

    A stage is looked at when every stage it depends on has finished: up to date, it is
    skipped; restorable from the run-cache, the driver restores it; otherwise it is sent to a
    worker, asking for ``resources`` (e.g. {"GPU": 1}). A failed stage's dependants never start.
    """
    from distributed import as_completed

    repo = open_repo()
    upstream, stages = plan(repo, targets)
    run = _Run(repo, upstream, stages, client, dict(gpus or {}), dict(resources or {}))
    before = lock_entries(repo, run.order)
    start = time.monotonic()
    finished = as_completed()
    log.info("%d stages, %d to start with", len(run.order), len(run.ready))
    try:
        while run.ready or run.running:
            while run.ready:
                future = run.start(run.ready.popleft())
                if future is not None:
                    finished.add(future)
            if run.running:
                run.finish(next(finished))
    finally:
        for future in run.running:
            future.cancel()
        if run.outcome.ran or run.outcome.restored:
            keep_serial_lock_order(repo, run.order, before)
        repo.close()
    done = run.outcome
    log.info("done in %.1f s: %d ran on workers, %d restored, %d up to date, %d failed, %d not run",
             _since(start), len(done.ran), len(done.restored), len(done.up_to_date),
             len(done.failed), len(done.not_run))  # fmt: skip
    return done


class _Run:
    """The state of one reproduction: what waits on what, what runs, what happened."""

    def __init__(self, repo, upstream, stages, client, gpus, resources):
        self.repo, self.stages, self.client = repo, stages, client
        self.gpus, self.resources = gpus, resources
        self.order = list(upstream)
        self.down = dependants(upstream)
        self.waiting = {name: len(ups) for name, ups in upstream.items()}
        self.ready = deque(name for name in self.order if not self.waiting[name])
        self.running: dict[Any, str] = {}
        self.outcome = Outcome()
        self.ignores = ignore_entries(stages)
        entries = [
            f"{file}\n{line}"
            for name in self.order
            for file, lines in self.ignores.get(name, {}).items()
            for line in lines
        ]
        self.ignore_rank = {entry: index for index, entry in enumerate(dict.fromkeys(entries))}
        self.ignore_before = {
            file: set(Path(file).read_text().splitlines()) if Path(file).exists() else set()
            for lines in self.ignores.values() for file in lines
        }  # fmt: skip

    def start(self, name: str) -> Any:
        """Skips, restores or submits a stage whose upstream stages are done; its future if
        submitted."""
        try:
            kind = classify(self.repo, self.stages[name])
        except Exception as err:  # e.g. a missing dependency: DVC says so in the stage's log
            log.debug("cannot classify %s (%s): a worker runs it", name, err)
            kind = RUN
        if kind == RUN:
            future = _submit(self.client, name, self.gpus, self.resources)
            self.running[future] = name
            log.info("started   %s", name)
            return future
        if kind == RESTORE:
            began = time.monotonic()
            try:
                restore(self.repo, name)
            except Exception as err:  # a cache file gone: as a failed stage
                message = f"(restore failed: {type(err).__name__}: {err})"
                self.fail(StageRun(name, -1, _since(began), message))
                return None
            self.outcome.restored.append(name)
            log.info("restored  %s from the run-cache (%.1f s)", name, _since(began))
        else:
            self.outcome.up_to_date.append(name)
            log.info("up to date %s", name)
        self.release(name)
        return None

    def finish(self, future: Any) -> None:
        name = self.running.pop(future)
        result = _result(future, name)
        if result.returncode:
            self.fail(result)
            return
        self.outcome.ran.append(result)
        log.info("finished  %s in %.1f s on worker %s", name, result.seconds, result.worker)
        self.release(name)

    def release(self, name: str) -> None:
        files = list(self.ignores.get(name, {}))
        if files:
            with self.repo.lock:  # DVC writes .gitignore files under this lock
                keep_serial_ignore_order(files, self.ignore_rank, self.ignore_before)
        for dependant in self.down[name]:
            self.waiting[dependant] -= 1
            if not self.waiting[dependant]:
                self.ready.append(dependant)

    def fail(self, result: StageRun) -> None:
        """Its dependants never become ready: they wait on a stage that never releases them."""
        skipped = downstream_of(result.stage, self.down)
        self.outcome.failed.append(result)
        self.outcome.not_run.update(dict.fromkeys(skipped, result.stage))
        log.error(
            "FAILED    %s (exit %d) after %.1f s; not run: %s",
            *(result.stage, result.returncode, result.seconds, ", ".join(skipped) or "none"),
        )


def _submit(client: Any, name: str, gpus: dict, resources: dict) -> Any:
    log_path = os.path.abspath(LOG_DIR / f"{re.sub(r'[^A-Za-z0-9@._-]', '_', name)}.log")
    future = client.submit(
        run_stage, name, os.getcwd(), log_path, dict(gpus),
        key=f"stage-{name}-{time.monotonic_ns()}", resources=resources or None, pure=False,
    )  # fmt: skip
    return future


def _result(future: Any, name: str) -> StageRun:
    """The worker's StageRun; a worker that died or raised counts as the stage failing."""
    try:
        return future.result()
    except Exception as err:  # the worker, not the stage: still a named failure
        return StageRun(name, -1, 0.0, f"(worker error: {type(err).__name__}: {err})")


def _since(start: float) -> float:
    return time.monotonic() - start


# --- clusters -------------------------------------------------------------------------------


def local_cluster(jobs: int, gpus: Sequence[str] = ()) -> tuple[Any, dict[str, str], dict]:
    """(cluster, {worker name: its GPU}, resources every stage asks for) on this machine.

    One worker per GPU, each declaring the resource GPU=1 and giving its stages that GPU
    through CUDA_VISIBLE_DEVICES; without GPUs, ``jobs`` workers. Workers are threads: each
    only waits on its stage's `dvc` process, so no worker process has to start.
    """
    from distributed import LocalCluster

    count = len(gpus) or jobs
    if count < 1:
        raise ValueError(f"--jobs {jobs}: expected at least 1 worker")
    cluster = LocalCluster(
        n_workers=count,
        threads_per_worker=1,
        processes=False,
        resources={"GPU": 1} if gpus else None,
        dashboard_address=None,
    )
    pinned = {str(name): str(gpu) for name, gpu in zip(sorted(cluster.workers), gpus, strict=False)}
    return cluster, pinned, ({"GPU": 1} if gpus else {})


def jobqueue_cluster(config_path: str | os.PathLike) -> tuple[Any, dict]:
    """(dask_jobqueue cluster, resources every stage asks for) from a dask config file.

    The file holds one ``jobqueue.<slurm|pbs|sge|lsf>`` section in dask_jobqueue's own config
    format (see configs/cluster/slurm.yaml). A stage asks for GPU=1 when the workers declare
    it (``worker-extra-args: [--resources, GPU=1]``), so each GPU runs one stage at a time.
    """
    import dask_jobqueue

    kind, section = read_jobqueue_config(config_path)
    # as arguments, not dask.config.set: each job reads its settings when it is created
    settings = {key.replace("-", "_"): value for key, value in section.items()}
    try:
        cluster = getattr(dask_jobqueue, JOBQUEUE[kind])(**settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--cluster {config_path}: {_one_line(err)}") from None
    declared = worker_resources(section.get("worker-extra-args") or [])
    return cluster, ({"GPU": 1} if "GPU" in declared else {})


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def read_jobqueue_config(config_path: str | os.PathLike) -> tuple[str, dict]:
    path = Path(config_path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--cluster {path}: cannot read it ({err})") from None
    sections = config.get("jobqueue") if isinstance(config, dict) else None
    kinds = list(sections) if isinstance(sections, dict) else []
    if len(kinds) != 1 or kinds[0] not in JOBQUEUE or not isinstance(sections[kinds[0]], dict):
        raise ValueError(
            f"--cluster {path}: found jobqueue sections {kinds}; expected exactly one of "
            f"jobqueue.{{{','.join(JOBQUEUE)}}} holding dask_jobqueue settings"
        )
    return kinds[0], sections[kinds[0]]


def worker_resources(args: Sequence[str]) -> dict[str, float]:
    """The ``--resources "GPU=1 MEM=2e9"`` of dask worker arguments, as a dict."""
    found: dict[str, float] = {}
    for flag, value in zip(args, list(args)[1:], strict=False):
        if flag == "--resources":
            for pair in str(value).replace(",", " ").split():
                key, _, amount = pair.partition("=")
                found[key] = float(amount)
    return found
