"""Shared wiring of the stage scripts: params (validated), JSON, task files, the model.

The one place params.yaml is read. Each stage asks for the sections it uses; they are checked
before any work, and a bad value fails with the key, the value and what is allowed.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import yaml

from mergeloom import data, vectors
from mergeloom.data import Split, Task

PARAMS = Path("params.yaml")
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
log = logging.getLogger("stages")


# ---------------------------------------------------------------- params


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _numbers(v: object) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_number(x) for x in v)


def _fractions(v: object) -> bool:
    return _numbers(v) and all(0 < x <= 1 for x in v)


def _names(known: Sequence[str], minimum: int = 1) -> Callable[[object], bool]:
    def check(v: object) -> bool:
        ok = isinstance(v, list) and len(v) >= minimum and len(set(v)) == len(v)
        return ok and all(x in known for x in v)

    return check


METHOD_NAMES = [
    "weight_averaging",
    "task_arithmetic",
    "ties",
    "dare",
    "breadcrumbs",
    "magmax",
    "random_mix",
    "pcb",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "cart",
    "consensus",
]
POOL_NAMES = ["mean", "random", "max_abs", *METHOD_NAMES]  # tests check both against the library
RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "model.name": (lambda v: isinstance(v, str) and v != "", "an open_clip name or config path"),
    "model.pretrained": (lambda v: v is None or isinstance(v, str), "null or a tag/path"),
    "model.device": (
        lambda v: v in ("auto", "cpu") or str(v).startswith("cuda"),
        "auto, cpu or cuda[:N]",
    ),  # fmt: skip
    "data.image_size": (lambda v: _is_int(v) and v >= 8, "an integer >= 8"),
    "data.val_fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "data.test_fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "data.seed": (_is_int, "an integer"),
    "setups.multitask.tasks": (_names(list(data.MULTITASK)), f"a list of {list(data.MULTITASK)}"),
    "setups.continual.class_order": (
        lambda v: isinstance(v, list) and sorted(v) == list(range(10)),
        "a permutation of 0..9",
    ),  # fmt: skip
    "setups.continual.n_tasks": (lambda v: _is_int(v) and 2 <= v <= 10, "an integer in 2..10"),
    "setups.domains.domains": (_names(list(data.DOMAINS), 2), f"2+ of {list(data.DOMAINS)}"),
    "merge.methods": (
        lambda v: isinstance(v, dict) and len(v) > 0 and set(v) <= set(METHOD_NAMES),
        f"a non-empty mapping with keys among {METHOD_NAMES}",
    ),  # fmt: skip
    "sweep.lambdas": (_numbers, "a non-empty list of numbers"),
    "weave.methods": (
        lambda v: isinstance(v, list) and all(m in METHOD_NAMES for m in v),
        f"a list of {METHOD_NAMES}",
    ),  # fmt: skip
    "weave.pools": (_names(POOL_NAMES), f"a non-empty list of {POOL_NAMES}"),
    "weave.lambdas": (_numbers, "a non-empty list of numbers"),
    "weave.collaborative": (lambda v: isinstance(v, bool), "true or false"),
    "weave.seed": (_is_int, "an integer"),
    "evaluate.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "analysis.topk": (lambda v: _fractions(v) and 1 not in v, "a non-empty list in (0, 1)"),
    "analysis.energy_top": (_fractions, "a non-empty list of fractions in (0, 1]"),
}
for _section in ("pretrain", "finetune"):
    RULES |= {
        f"{_section}.steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        f"{_section}.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        f"{_section}.lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
        f"{_section}.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        f"{_section}.warmup_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        f"{_section}.seed": (_is_int, "an integer"),
    }


def _lookup(params: Mapping, dotted: str) -> object:
    node: object = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"params.yaml: missing key {dotted!r}")
        node = node[part]
    return node


def load_params(*sections: str, path: Path = PARAMS) -> dict:
    """The named top-level sections of params.yaml, validated against RULES."""
    params = yaml.safe_load(path.read_text()) or {}
    for key, (ok, allowed) in RULES.items():
        if key.split(".")[0] in sections and not ok(value := _lookup(params, key)):
            raise ValueError(f"params.yaml: {key} = {value!r} is invalid; expected {allowed}")
    if "merge" in sections:
        from mergeloom import methods  # here, so stages without merges do not depend on it

        for name, kwargs in params["merge"]["methods"].items():
            try:
                inspect.signature(methods.METHODS[name]).bind([], **(kwargs or {}))
            except TypeError as err:
                raise ValueError(f"params.yaml: merge.methods.{name}: {err}") from err
    if "weave" in sections and "merge" in sections:
        missing = [m for m in params["weave"]["methods"] if m not in params["merge"]["methods"]]
        if missing:
            raise ValueError(f"params.yaml: weave.methods {missing} are not in merge.methods")
    return {s: params[s] for s in sections}


def continual_splits(setup: Mapping) -> dict[str, list[int]]:
    """split name -> its classes, as mergeloom.data.continual_tasks cuts class_order."""
    order, n = setup["class_order"], setup["n_tasks"]
    return {f"split{t}": sorted(order[10 * t // n : 10 * (t + 1) // n]) for t in range(n)}


# ---------------------------------------------------------------- files


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Sorted keys (stable diffs for `dvc metrics diff`), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    vectors.make_readable(tmp)
    os.replace(tmp, path)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping], fieldnames: Sequence[str]) -> None:
    """A table for `dvc plots`, written atomically like every other output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)
    vectors.make_readable(tmp)
    os.replace(tmp, path)


def save_task(task: Task, path: Path) -> None:
    tensors = {f"{s}_{part}": getattr(getattr(task, s), part)
               for s in ("train", "val", "test") for part in ("images", "labels")}  # fmt: skip
    meta = {"name": task.name, "classnames": list(task.classnames),
            "templates": list(task.templates)}  # fmt: skip
    vectors.save(tensors, path, metadata=vectors.metadata_json(meta))


def load_task(path: str | os.PathLike) -> Task:
    source = vectors.SafetensorsFile(path)
    meta = source.metadata
    splits = {s: Split(source[f"{s}_images"], source[f"{s}_labels"])
              for s in ("train", "val", "test")}  # fmt: skip
    return Task(meta["name"], tuple(json.loads(meta["classnames"])),
                tuple(json.loads(meta["templates"])), **splits)  # fmt: skip


def check_pipeline() -> None:
    """Fail early when dvc.yaml was generated from other task lists than params.yaml holds."""
    from stages import pipeline

    if Path("dvc.yaml").exists() and Path("dvc.yaml").read_text() != pipeline.render():
        raise ValueError("dvc.yaml is out of date with params.yaml: run `make pipeline`")


def run(main: Callable[[], None]) -> None:
    """Run a stage's main; bad input ends with one line naming it, and exit status 2."""
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


# ---------------------------------------------------------------- units of evaluation


def units(setups: Mapping) -> dict[str, tuple[str, list[str]]]:
    """unit -> (setup, expert names). A unit is one set of experts merged and evaluated."""
    splits = list(continual_splits(setups["continual"]))
    return {
        "multitask": ("multitask", list(setups["multitask"]["tasks"])),
        "continual": ("continual", splits),
        "continual_sequential": ("continual", splits),
        "domains": ("domains", list(setups["domains"]["domains"])),
    }


def evaluated(setup: str, tasks: Sequence[str]) -> list[str]:
    """Task files a setup is scored on: continual uses the 10-way ``all_digits`` task."""
    return ["all_digits"] if setup == "continual" else list(tasks)


def load_model(p: Mapping, pretrained: Path) -> tuple:
    """The pretrained CLIP (image encoder swapped per evaluation) and the device."""
    from mergeloom import clip

    model, _ = clip.load_clip(p["model"]["name"])
    clip.load_full_state(model, vectors.load(pretrained))
    return model, clip.pick_device(p["model"]["device"])


def problems(setup: str, tasks: Sequence[str], p: Mapping, data_dir: Path,
             heads_dir: Path) -> list:  # fmt: skip
    """The merge problems of one unit (mergeloom.protocol), read from the data and heads."""
    from mergeloom import protocol

    names = evaluated(setup, tasks)
    loaded = [load_task(data_dir / setup / f"{n}.safetensors") for n in names]
    heads = {n: vectors.load(heads_dir / setup / f"{n}.safetensors")["head"] for n in names}
    if setup == "multitask":
        return protocol.multitask_problems(loaded, heads)
    if setup == "continual":
        splits = continual_splits(p["setups"]["continual"])
        return protocol.continual_problems(splits, loaded[0], heads["all_digits"])
    return protocol.domain_problems(loaded, heads)


def load_dir(folder: Path, names: Sequence[str]) -> dict[str, vectors.StateDict]:
    """{name: state} of <folder>/<name>.safetensors, exactly the names given."""
    return {name: vectors.load(folder / f"{name}.safetensors") for name in names}


def task_name(path: str | os.PathLike) -> str:
    """Inside a folder argument, files are named <task or method>.safetensors."""
    return Path(path).name.removesuffix(".safetensors")
