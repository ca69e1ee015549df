"""The three evaluation setups in one place: their units of experts, their tasks, their problems.

A *setup* (docs/methods.md#multitask, #continual, #domains) is multitask, continual or domains; its
config names where the data comes from (``dataset``: the embedded ``digits``, written by the data
stage as safetensors task files, or real datasets read from a datasets root) and which tasks it
has. A *unit* is one set of experts that is merged and evaluated: every setup has its individually
fine-tuned unit, and the continual setup also the sequential chain (each split starts from the
previous split's expert).

The same functions serve the embedded default and the real-scale presets: only the task loader
differs (``load_tasks``), the problems are built from ``mergeloom.protocol`` either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeloom import protocol, tasks, vectors
from mergeloom.tasks import Task

ALL = "all"  # continual: the task with every class, scored with one head (task-agnostic)
DIGIT_CLASSES = 10


@dataclass(frozen=True)
class Unit:
    name: str  # multitask | continual | continual_sequential | domains
    setup: str
    tasks: tuple[str, ...]  # expert names, in training (and task-vector) order
    sequential: bool  # expert t starts from expert t-1


def class_order(cfg: Mapping) -> list[int]:
    """The continual class order: given, or the dataset's default (MagMax's for CIFAR-100)."""
    if cfg.get("class_order") is not None:
        return list(cfg["class_order"])
    if cfg["dataset"] == "digits":
        return list(range(DIGIT_CLASSES))
    if cfg["dataset"] == "CIFAR100":
        from mergeloom.datasets import MAGMAX_CIFAR100_ORDER

        return list(MAGMAX_CIFAR100_ORDER)
    raise ValueError(f"setups.continual.dataset = {cfg['dataset']!r}: give a class_order")


def continual_splits(cfg: Mapping) -> dict[str, list[int]]:
    """split name -> its classes: order[C t/n : C (t+1)/n], sorted (MagMax's cut)."""
    order, n = class_order(cfg), cfg["n_tasks"]
    if not 2 <= n <= len(order):
        raise ValueError(f"setups.continual.n_tasks = {n} is invalid; expected 2..{len(order)}")
    c = len(order)
    return {f"split{t}": sorted(order[c * t // n : c * (t + 1) // n]) for t in range(n)}


def expert_names(setup: str, cfg: Mapping) -> list[str]:
    if setup == "multitask":
        return list(cfg["tasks"])
    if setup == "continual":
        return list(continual_splits(cfg))
    return list(cfg["domains"])


def units(setups: Mapping) -> dict[str, Unit]:
    """unit name -> Unit, for the setups present (continual gives two units)."""
    out = {}
    for setup, cfg in setups.items():
        names = tuple(expert_names(setup, cfg))
        out[setup] = Unit(setup, setup, names, sequential=False)
        if setup == "continual":
            out["continual_sequential"] = Unit("continual_sequential", setup, names, True)
    return out


def task_names(setup: str, cfg: Mapping) -> list[str]:
    """Every task a setup has a head for: the experts' tasks, and continual's ``all``."""
    names = expert_names(setup, cfg)
    return [*names, ALL] if setup == "continual" else names


def digit_task_files(setup: str, cfg: Mapping) -> list[str]:
    """Task files the data stage writes for a digits setup (continual: only ``all``)."""
    return [ALL] if setup == "continual" else expert_names(setup, cfg)


def load_tasks(
    setup: str,
    cfg: Mapping,
    data: Mapping,
    *,
    data_dir: Path,
    datasets_root: Path,
    names: Sequence[str] | None = None,
) -> dict[str, Task]:
    """name -> Task for ``names`` (default: ``task_names``), read from disk.

    Digits tasks come from ``data_dir/<setup>/<name>.safetensors``; real datasets from
    ``datasets_root`` (``mergeloom.datasets``), with the validation split of ``data``. A
    continual split is the ``all`` task restricted to its classes, labels remapped.

    Raises:
        ValueError: A task file or dataset is missing (naming the path), or an unknown name.
    """
    from mergeloom import datasets  # here: torchvision costs a second of every stage's start-up

    wanted = list(names) if names is not None else task_names(setup, cfg)
    split = {"val_fraction": data["val_fraction"], "val_max": data["val_max"],
             "seed": data["seed"]}  # fmt: skip
    digits = cfg["dataset"] == "digits"

    def digit(name: str) -> Task:
        path = Path(data_dir) / setup / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"task file not found: {path} (written by the data stage)")
        return tasks.load_task(path)

    if setup == "multitask":
        if digits:
            return {n: digit(n) for n in wanted}
        return {n: datasets.load_task(n, datasets_root, **split) for n in wanted}
    if setup == "continual":
        splits = continual_splits(cfg)
        unknown = [n for n in wanted if n != ALL and n not in splits]
        if unknown:
            raise ValueError(f"unknown continual task(s) {unknown}; known: {[*splits, ALL]}")
        full = digit(ALL) if digits else datasets.load_task(cfg["dataset"], datasets_root, **split)
        if len(full.classnames) != len(class_order(cfg)):
            raise ValueError(f"setups.continual.class_order has {len(class_order(cfg))} classes, "
                             f"{cfg['dataset']} has {len(full.classnames)}")  # fmt: skip
        return {n: full if n == ALL else tasks.class_subset(full, splits[n], n) for n in wanted}
    if digits:
        return {n: digit(n) for n in wanted}
    every = datasets.domain_tasks(Path(datasets_root) / cfg["dataset"], cfg["domains"],
                                  test_fraction=data["test_fraction"], **split)  # fmt: skip
    return {t.name: t for t in every if t.name in wanted}


def problems(
    setup: str, cfg: Mapping, loaded: Mapping[str, Task], heads: Mapping[str, torch.Tensor]
) -> list[protocol.Problem]:
    """The merge problems of a setup (the same for its individual and sequential units)."""
    if setup == "multitask":
        return protocol.multitask_problems([loaded[n] for n in cfg["tasks"]], heads)
    if setup == "continual":
        return protocol.continual_problems(continual_splits(cfg), loaded[ALL], heads[ALL])
    return protocol.domain_problems([loaded[n] for n in cfg["domains"]], heads)


def unit_problems(
    setups: Mapping, data: Mapping, *, data_dir: Path, heads_dir: Path, datasets_root: Path
) -> dict[str, list[protocol.Problem]]:
    """unit -> its merge problems, with the heads written by the heads stage."""
    by_setup = {}
    for setup, cfg in setups.items():
        loaded = load_tasks(setup, cfg, data, data_dir=data_dir, datasets_root=datasets_root)
        heads = {}
        for name in loaded:
            path = Path(heads_dir) / setup / f"{name}.safetensors"
            if not path.is_file():
                raise ValueError(f"head file not found: {path} (written by the heads stage)")
            heads[name] = vectors.load(path)["head"]
        by_setup[setup] = problems(setup, cfg, loaded, heads)
    return {name: by_setup[unit.setup] for name, unit in units(setups).items()}


def in_memory(dataset: object) -> bool:
    """True for tensors already in memory (the digits), possibly behind index subsets: no
    DataLoader workers are worth starting for them."""
    while not isinstance(dataset, tasks.TensorImages):
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return False
    return True
