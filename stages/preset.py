"""Real-scale presets (presets/*.yaml): read and validate one, and build its tasks and problems.

A preset is a params file for real models and data; its sections are documented in the files
under presets/. Like params.yaml, every value is checked before any work and a bad one fails with
the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergeloom import datasets
from mergeloom.datasets import TaskData
from stages.common import METHOD_NAMES, POOL_NAMES, RULES, _is_int, _is_number, _lookup

KINDS = ("multitask", "continual", "domains")
_Rule = tuple[Callable[[object], bool], str]
PRESET_RULES: dict[str, _Rule] = {
    **{k: v for k, v in RULES.items() if k.startswith("model.")},
    "datasets.root": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "datasets.download": (lambda v: isinstance(v, bool), "true or false"),
    "datasets.val_fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "datasets.val_max": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "datasets.seed": (_is_int, "an integer"),
    "datasets.num_workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "setup.kind": (lambda v: v in KINDS, f"one of {list(KINDS)}"),
    "finetune.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "finetune.lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "finetune.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "finetune.warmup_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "finetune.grad_clip": (lambda v: v is None or (_is_number(v) and v > 0), "null or > 0"),
    "finetune.seed": (_is_int, "an integer"),
    "finetune.accumulate": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "finetune.checkpoint_every": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "finetune.sequential": (lambda v: isinstance(v, bool), "true or false"),
    "evaluate.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "merge": (lambda v: isinstance(v, dict) and set(v) <= set(METHOD_NAMES),
              f"a mapping with keys among {METHOD_NAMES}"),
    "weave.pools": (lambda v: isinstance(v, list) and set(v) <= set(POOL_NAMES),
                    f"a list of {POOL_NAMES}"),
}  # fmt: skip
_SETUP_RULES: dict[str, dict[str, _Rule]] = {
    "multitask": {"setup.tasks": (lambda v: isinstance(v, list) and 0 < len(v) == len(set(v))
                                  and set(v) <= set(datasets.SOURCES),
                                  f"a list of distinct names among {list(datasets.SOURCES)}")},
    "continual": {"setup.dataset": (lambda v: v == "CIFAR100", "CIFAR100"),
                  "setup.n_tasks": (lambda v: v in datasets.CIFAR100_SPLITS,
                                    f"one of {list(datasets.CIFAR100_SPLITS)}")},
    "domains": {"setup.tasks": (lambda v: isinstance(v, list) and len(v) >= 2,
                                "a list of 2+ domain folder names"),
                "setup.test_fraction": (lambda v: _is_number(v) and 0 < v < 1, "in (0, 1)")},
}  # fmt: skip


def load(path: Path) -> dict:
    """The preset at ``path``, validated; ``finetune.epochs`` is per task or one number."""
    if not path.is_file():
        known = sorted(str(p) for p in Path("presets").glob("*.yaml"))
        raise ValueError(f"preset file not found: {path}; the presets are {known}")
    preset = yaml.safe_load(path.read_text()) or {}

    def get(key: str) -> object:
        try:
            return _lookup(preset, key)
        except ValueError:
            raise ValueError(f"{path}: missing key {key!r}") from None

    rules = PRESET_RULES | _SETUP_RULES.get(get("setup.kind"), {})
    if not preset.get("weave"):  # weaving is optional
        rules.pop("weave.pools")
    for key, (ok, allowed) in rules.items():
        if not ok(value := get(key)):
            raise ValueError(f"{path}: {key} = {value!r} is invalid; expected {allowed}")
    epochs = get("finetune.epochs")
    for name in task_names(preset):
        e = epochs.get(name) if isinstance(epochs, dict) else epochs
        if not (_is_number(e) and e > 0):
            raise ValueError(
                f"{path}: finetune.epochs for {name} = {e!r} is invalid; expected "
                "a number > 0 (one for all tasks, or a mapping task -> epochs)"
            )
    missing = [m for m in preset.get("weave", {}).get("methods", []) if m not in preset["merge"]]
    if missing:
        raise ValueError(f"{path}: weave.methods {missing} are not in merge")
    return preset


def task_names(preset: dict) -> list[str]:
    """The experts' names, in training (and task-vector) order."""
    setup = preset["setup"]
    if setup["kind"] == "continual":
        return [f"split{t}" for t in range(setup["n_tasks"])]
    return list(setup["tasks"])


def epochs(preset: dict, name: str) -> float:
    e = preset["finetune"]["epochs"]
    return e[name] if isinstance(e, dict) else e


@dataclass(frozen=True)
class Plan:
    """What a preset trains and how its merges are scored."""

    train: dict[str, TaskData]  # expert name -> its training task (subset head for CL)
    eval_sets: dict[str, TaskData]  # evaluation set name -> task (its test split is scored)
    problems: dict[str, tuple[list[str], list[str]]]  # problem -> (merged experts, eval sets)
    expert_sets: dict[str, list[str]]  # expert -> evaluation sets it is scored on


def plan(preset: dict) -> Plan:
    """Build the tasks from disk (fails at once, naming what is missing) and the problems."""
    d, setup = preset["datasets"], preset["setup"]
    split = {"val_fraction": d["val_fraction"], "val_max": d["val_max"], "seed": d["seed"]}
    names = task_names(preset)
    if setup["kind"] == "multitask":
        tasks = {n: datasets.load_task(n, d["root"], download=d["download"], **split)
                 for n in names}  # fmt: skip
        return Plan(tasks, tasks, {"all": (names, names)}, {n: [n] for n in names})
    if setup["kind"] == "continual":
        full = datasets.load_task("CIFAR100", d["root"], download=d["download"], **split)
        classes = datasets.cifar100_class_splits(setup["n_tasks"])
        tasks = {n: datasets.class_subset(full, c, n) for n, c in zip(names, classes, strict=True)}
        return Plan(tasks, {"all": full}, {"all": (names, ["all"])}, {n: ["all"] for n in names})
    tasks = {t.name: t for t in datasets.domain_tasks(d["root"], names,
             test_fraction=setup["test_fraction"], **split)}  # fmt: skip
    problems = {held: (others, [held]) for held, others in datasets.leave_one_out(names).items()}
    return Plan(tasks, tasks, problems, {n: names for n in names})
