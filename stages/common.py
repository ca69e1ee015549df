"""Wiring shared by the stage scripts: params (validated), runtime settings, JSON/CSV output.

Every stage imports this module, so it holds nothing that changes often: no method, pool or task
names (those come from the library's registries, checked by the stages that use them and by
`python -m stages.pipeline`), and no library imports beyond `mergeloom.vectors`.

Two kinds of settings:
* tracked params: the `params.yaml` next to `dvc.yaml` (the embedded default at the repository
  root, a preset in `presets/<name>/`); one schema, checked here before a stage does any work;
* runtime settings (`runtime()`): device, DataLoader workers, evaluation batch size and the
  datasets root, read from the environment. They are not DVC params, so changing them reruns
  nothing; results do not depend on them beyond float rounding.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml

from mergeloom import vectors, yamlio

PARAMS = Path("params.yaml")
SHAPE_PREFIX = "# pipeline shape: "
log = logging.getLogger("stages")
OUR_LOGGERS = ("stages", "mergeloom")


# ---------------------------------------------------------------- params


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _numbers(v: object) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_number(x) for x in v)


def _fractions(v: object) -> bool:
    return _numbers(v) and all(0 < x <= 1 for x in v)


def _names(minimum: int = 1) -> Callable[[object], bool]:
    def check(v: object) -> bool:
        ok = isinstance(v, list) and len(v) >= minimum and len(set(map(str, v))) == len(v)
        return ok and all(isinstance(x, str) and x for x in v)

    return check


def _mapping(v: object) -> bool:
    return isinstance(v, dict)


def _epochs(v: object) -> bool:
    if isinstance(v, dict):
        return len(v) > 0 and all(_is_number(e) and e > 0 for e in v.values())
    return _is_number(v) and v > 0


_Rule = tuple[Callable[[object], bool], str]
_INT_GE1: _Rule = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
_INT_GE0: _Rule = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_FRACTION: _Rule = (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)")
_POSITIVE: _Rule = (lambda v: _is_number(v) and v > 0, "a number > 0")
_NONNEG: _Rule = (lambda v: _is_number(v) and v >= 0, "a number >= 0")
_INT: _Rule = (_is_int, "an integer")
_STR: _Rule = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
# section -> key -> rule; a key that is optional is listed in OPTIONAL.
SCHEMA: dict[str, dict[str, _Rule]] = {
    "model": {"name": (_STR[0], "an open_clip model name or a model config JSON path"),
              "pretrained": (lambda v: v is None or (isinstance(v, str) and v != ""),
                             "null (trained by the pretrain stage), an open_clip tag or a path")},
    "data": {"val_fraction": _FRACTION, "val_max": _INT_GE1, "test_fraction": _FRACTION,
             "image_size": (lambda v: _is_int(v) and v >= 8, "an integer >= 8"), "seed": _INT},
    "pretrain": {"steps": _INT_GE1, "batch_size": _INT_GE1, "lr": _POSITIVE,
                 "weight_decay": _NONNEG, "warmup_steps": _INT_GE0, "seed": _INT},
    "finetune": {"steps": _INT_GE1,
                 "epochs": (_epochs, "a number > 0, or a mapping task -> number > 0"),
                 "batch_size": _INT_GE1, "lr": _POSITIVE, "weight_decay": _NONNEG,
                 "warmup_steps": _INT_GE0,
                 "grad_clip": (lambda v: v is None or (_is_number(v) and v > 0), "null or > 0"),
                 "accumulate": _INT_GE1, "checkpoint_every": _INT_GE0, "seed": _INT},
    "merge": {"methods": (lambda v: _mapping(v) and len(v) > 0
                          and all(h is None or _mapping(h) for h in v.values()),
                          "a non-empty mapping method name -> keyword arguments")},
    "sweep": {"lambdas": (_numbers, "a non-empty list of numbers")},
    "weave": {"methods": (_names(1), "a non-empty list of distinct method names"),
              "pools": (_names(1), "a non-empty list of distinct pool names"),
              "lambdas": (_numbers, "a non-empty list of numbers"),
              "collaborative": (lambda v: isinstance(v, bool), "true or false"),
              "seed": _INT,
              "pool_hyperparameters": (lambda v: _mapping(v)
                                       and all(_mapping(h) for h in v.values()),
                                       "a mapping pool name -> keyword arguments")},
    "analysis": {"topk": (lambda v: _fractions(v) and 1 not in v, "a non-empty list in (0, 1)"),
                 "energy_top": (_fractions, "a non-empty list of fractions in (0, 1]")},
}  # fmt: skip
SETUPS: dict[str, dict[str, _Rule]] = {
    "multitask": {"dataset": (lambda v: v in ("digits", "benchmarks"), "digits or benchmarks"),
                  "tasks": (_names(1), "a non-empty list of distinct task names")},
    "continual": {"dataset": (_STR[0], "digits or CIFAR100"),
                  "n_tasks": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
                  "class_order": (lambda v: v is None or (isinstance(v, list) and len(v) > 1
                                  and sorted(v) == list(range(len(v)))),
                                  "null (the dataset's default order) or a permutation of "
                                  "0..C-1")},
    "domains": {"dataset": (_STR[0], "digits or a folder name under the datasets root"),
                "domains": (_names(2), "a list of 2+ distinct domain names")},
}  # fmt: skip
OPTIONAL = {"finetune.steps", "finetune.epochs", "continual.class_order"}


def _fail(key: str, value: object, allowed: str) -> ValueError:
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = " (it is quoted, so YAML reads a string: remove the quotes)"
        except ValueError:
            pass
    return ValueError(f"params.yaml: {key} = {value!r} is invalid; expected {allowed}{hint}")


def _check_section(name: str, node: object, rules: Mapping[str, _Rule], prefix: str) -> None:
    if not isinstance(node, dict):
        raise _fail(prefix, node, f"a mapping with keys {list(rules)}")
    unknown = [k for k in node if k not in rules]
    if unknown:
        raise ValueError(f"params.yaml: unknown key {prefix}.{unknown[0]}; known: {list(rules)}")
    for key, (ok, allowed) in rules.items():
        if key not in node:
            if f"{name}.{key}" in OPTIONAL:
                continue
            raise ValueError(f"params.yaml: missing key {prefix}.{key!r}")
        if not ok(node[key]):
            raise _fail(f"{prefix}.{key}", node[key], allowed)


def check_params(params: Mapping, sections: Sequence[str]) -> None:
    """Raise ValueError naming the key, the value and what is allowed, for the given sections."""
    for section in sections:
        if section not in params:
            raise ValueError(f"params.yaml: missing section {section!r}")
        node = params[section]
        if section == "setups":
            if not isinstance(node, dict) or not node or set(node) - set(SETUPS):
                raise _fail("setups", node, f"a non-empty mapping with keys among {list(SETUPS)}")
            for setup, cfg in node.items():
                _check_section(setup, cfg, SETUPS[setup], f"setups.{setup}")
        else:
            _check_section(section, node, SCHEMA[section], section)
    if "finetune" in sections:
        ft = params["finetune"]
        if ("steps" in ft) == ("epochs" in ft):
            raise ValueError("params.yaml: finetune needs exactly one of 'steps' and 'epochs'")
        if ft["batch_size"] % ft["accumulate"]:
            raise _fail("finetune.accumulate", ft["accumulate"],
                        f"a divisor of finetune.batch_size = {ft['batch_size']}")  # fmt: skip
    if "weave" in sections and "merge" in sections:
        missing = [m for m in params["weave"]["methods"] if m not in params["merge"]["methods"]]
        if missing:
            raise ValueError(f"params.yaml: weave.methods {missing} are not in merge.methods")


def read_params(path: Path = PARAMS) -> dict:
    try:
        params = yamlio.load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"params file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params


def load_params(*sections: str, path: Path = PARAMS) -> dict:
    """The named top-level sections of params.yaml, validated against SCHEMA/SETUPS."""
    params = read_params(path)
    check_params(params, sections)
    if "setups" in sections:
        check_pipeline(params, Path(path).parent / "dvc.yaml")
    return {s: params[s] for s in sections}


def pipeline_shape(params: Mapping) -> str:
    """What dvc.yaml's stage list depends on beyond DVC's templating: the setups present, the
    continual split count (a sequential chain is one stage per split), where data comes from.
    Task, domain, method and pool lists are templated in dvc.yaml and may change freely."""
    setups = params["setups"]
    parts = [f"{s}:{cfg['dataset']}" for s, cfg in setups.items()]
    if "continual" in setups:
        parts.append(f"n_tasks:{setups['continual']['n_tasks']}")
    trained = params.get("model", {}).get("pretrained") is None
    parts.append(f"pretrained:{'trained' if trained else 'given'}")
    if isinstance(params.get("finetune", {}).get("epochs"), dict):
        parts.append("epochs:per-task")
    return " ".join(parts)


def check_pipeline(params: Mapping, dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Fail early when dvc.yaml was generated for another pipeline shape than params.yaml's."""
    if not dvc_yaml.exists():
        return
    with dvc_yaml.open() as f:
        header = [next(f, "") for _ in range(3)]
    wanted = SHAPE_PREFIX + pipeline_shape(params) + "\n"
    if wanted not in header:
        raise ValueError(
            f"{dvc_yaml} is out of date with params.yaml (the setups or the continual split "
            "count changed): run `make pipeline`"
        )


# ---------------------------------------------------------------- user paths vs outputs


def pipeline_outputs(dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """Every path a stage of ``dvc_yaml`` writes (outs, metrics, plots), resolved. A templated
    path (models/experts/multitask/${item}.safetensors) stands for its folder: DVC replaces or
    deletes what is there when that stage runs."""
    if not dvc_yaml.exists():
        return []
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    paths = []
    for stage in stages.values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                path = next(iter(entry)) if isinstance(entry, dict) else str(entry)
                if "${" in path:
                    path = path[: path.index("${")].rpartition("/")[0] or "."
                paths.append((dvc_yaml.parent / path).resolve())
    return sorted(set(paths))


def check_outside_outputs(
    path: str | os.PathLike, what: str, dvc_yaml: Path = Path("dvc.yaml")
) -> None:
    """Refuse a user path (datasets, weights) that lies inside a DVC output or contains one:
    `dvc repro` deletes a stage's outputs before running it and `dvc checkout` restores them
    from the cache, so a user's files there would be lost."""
    user, outputs = Path(path).resolve(), pipeline_outputs(dvc_yaml)
    for out in outputs:
        if user == out or out in user.parents or user in out.parents:
            tops = sorted({os.path.relpath(o, dvc_yaml.parent.resolve()).split(os.sep)[0]
                           for o in outputs})  # fmt: skip
            raise ValueError(
                f"{what} = {str(path)!r} overlaps the DVC output {os.path.relpath(out)} (DVC "
                "deletes and restores outputs when their stage runs, so files there could be "
                f"lost): use a path that neither lies inside nor contains {', '.join(tops)}"
            )


# ---------------------------------------------------------------- runtime settings

RUNTIME_ENV = {
    "device": "MERGELOOM_DEVICE",  # auto (cuda when present) | cpu | cuda | cuda:N
    "num_workers": "MERGELOOM_NUM_WORKERS",  # DataLoader workers for datasets read from disk
    "eval_batch_size": "MERGELOOM_EVAL_BATCH_SIZE",
    "datasets_root": "MERGELOOM_DATASETS",  # torchvision/ImageFolder datasets
    "nproc_per_node": "MERGELOOM_NPROC_PER_NODE",  # processes fine-tuning one expert (torchrun)
}


def repository_root(start: Path | None = None) -> Path:
    """The nearest folder holding `.dvc/`, from the working directory up."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return here


def runtime() -> dict:
    """Runtime settings from the environment (RUNTIME_ENV), with their defaults.

    The default datasets root is `datasets/` at the repository root: git-ignored and outside
    every DVC output, so `dvc repro` never replaces a user's data.
    """
    env = {k: os.environ.get(v) for k, v in RUNTIME_ENV.items()}
    device = env["device"] or "auto"
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"{RUNTIME_ENV['device']} = {device!r} is invalid; expected auto, cpu, "
                         "cuda or cuda:N")  # fmt: skip
    out = {"device": device, "datasets_root": Path(env["datasets_root"] or
                                                   repository_root() / "datasets")}  # fmt: skip
    defaults = {"num_workers": min(8, os.cpu_count() or 1), "eval_batch_size": 256,
                "nproc_per_node": 1}  # fmt: skip
    for key, default in defaults.items():
        raw = env[key]
        try:
            value = default if raw is None else int(raw)
        except ValueError:
            value = -1
        if value < (0 if key == "num_workers" else 1):
            raise ValueError(f"{RUNTIME_ENV[key]} = {raw!r} is invalid; expected an integer "
                             f">= {0 if key == 'num_workers' else 1}")  # fmt: skip
        out[key] = value
    check_outside_outputs(out["datasets_root"], RUNTIME_ENV["datasets_root"])
    return out


# ---------------------------------------------------------------- files


def _atomic_text(path: Path, write: Callable) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        vectors.make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_text(Path(path), lambda f: f.write(text))


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Sorted keys (stable diffs for `dvc metrics diff`), written atomically."""

    def write(f) -> None:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")

    _atomic_text(Path(path), write)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping], fieldnames: Sequence[str]) -> None:
    """A table for `dvc plots`, written atomically like every other output."""

    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)

    _atomic_text(Path(path), write)


def setup_logging(verbose: bool = False) -> None:
    """Our INFO lines (one per stage: what it did, where it wrote) and everyone's warnings;
    other libraries' INFO lines (open_clip's model building) only when ``verbose``."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # unless one is set up
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """A stage's arguments plus `-v/--verbose`, with logging set up for it."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show other libraries' INFO lines")  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return args


def run(main: Callable[[], None]) -> None:
    """Run a stage's main; bad input ends with one line naming it, and exit status 2."""
    setup_logging()
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def task_name(path: str | os.PathLike) -> str:
    """Inside a folder argument, files are named <task or method>.safetensors."""
    return Path(path).name.removesuffix(".safetensors")
