"""``mergeloom`` command line: merge or weave any safetensors state dicts (not only CLIP).

    mergeloom methods
    mergeloom merge ties --pretrained P.safetensors --experts A.safetensors B.safetensors \\
        --out M.safetensors [--lam 1.0] [--set k=0.2 ...] [--device cpu]
    mergeloom weave ties --pretrained P.safetensors --experts A.safetensors B.safetensors \\
        --lambdas 0.05:1.0:0.05 --pool mean --out W.safetensors [--set k=0.2 ...] \\
        [--pool-set NAME=VALUE ...] [--no-collaborative] [--seed 0] [--device cpu]

Exit status: 0 done, 2 bad input, 1 any other failure (one ``mergeloom: error:`` line). Every
option and input header is checked before any tensor is read; --out never replaces an input or
a non-file, and a failed run leaves no file behind (an existing --out is kept).
"""

from __future__ import annotations

import argparse
import errno
import inspect
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

import torch

from mergeloom import methods, vectors, yamlio
from mergeloom.device import compute_on, pick_device
from mergeloom.weave import POOLS, effective_lam, get_pool, weave


def parse_lambdas(text: str) -> list[float]:
    """'start:stop:step' (stop included) or a comma list, e.g. '0.05:1.0:0.05' -> 20 values;
    each a finite number in [0, LAM_MAX] and at most MAX_LAMBDAS of them."""
    what = f"--lambdas {text!r}"
    if ":" in text:
        values = _lambda_range(text.split(":"), what)
    else:
        values = _numbers([part for part in text.split(",") if part.strip()], what)
    return methods.check_lambdas(values, what)


def _lambda_usage(what: str) -> ValueError:
    return ValueError(
        f"{what}: expected start:stop:step with step > 0 and start <= stop "
        "(e.g. 0.05:1.0:0.05) or a comma list (e.g. 0.1,0.3,0.5)"
    )


def _numbers(parts: Sequence[str], what: str) -> list[float]:
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise _lambda_usage(what) from None
    if not values:
        raise _lambda_usage(what)
    return values


def _lambda_range(parts: Sequence[str], what: str) -> list[float]:
    """The count is checked before any list is built: a step of 1e-9 would fill the memory."""
    if len(parts) != 3:
        raise _lambda_usage(what)
    start, stop, step = _numbers(parts, what)
    methods.check_lam(start, what)
    methods.check_lam(stop, what)
    if not (math.isfinite(step) and step > 0) or start > stop:
        raise _lambda_usage(what)
    span = (stop - start) / step
    if not span < methods.MAX_LAMBDAS:  # also inf, from a step such as 1e-320
        raise ValueError(
            f"{what} gives {span + 1:.4g} values; expected at most {methods.MAX_LAMBDAS} "
            "(a larger step)"
        )
    values = [round(start + i * step, 10) for i in range(round(span) + 1)]
    return [v for v in values if v <= stop + 1e-9]


def parse_assignments(pairs: Sequence[str], option: str) -> dict[str, object]:
    """name=value pairs; values are read as YAML scalars (0.2, true, ties, [1, 2])."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{option} {pair!r}: expected name=value")
        try:
            out[name.strip()] = yamlio.load(value)
        except yamlio.YAMLError as err:
            problem = getattr(err, "problem", None) or "not YAML"
            raise ValueError(f"{option} {pair!r}: cannot read the value ({problem})") from None
    return out


def check_hyperparameters(name: str, given: Mapping[str, object]) -> None:
    """Names first (listing what the method takes), then values by the method's own checks,
    so `--set k=abc` fails before any tensor is read."""
    allowed = list(inspect.signature(methods.get(name)).parameters)[1:]
    unknown = [g for g in given if g not in allowed]
    if unknown:
        raise ValueError(f"{name} has no hyperparameter {unknown}; it takes: {', '.join(allowed)}")
    if "lam" in given:
        methods.check_lam(given["lam"], f"{name}: lam")
    methods.check_hyperparameters(name, given)


def check_pool_hyperparameters(pool: str, given: Mapping[str, object]) -> None:
    """The pool exists, and --pool-set names and values suit it: only a method used as the
    pool takes them, and never lam (fixed)."""
    if pool not in POOLS and pool not in methods.METHODS:
        get_pool(pool, n_candidates=1)  # raises, naming the unknown pool and the known ones
    if not given:
        return
    if pool in POOLS:
        raise ValueError(
            f"--pool-set {list(given)}: pool {pool!r} takes no hyperparameters "
            "(--pool-set applies when --pool is a method name; the random pool's seed is --seed)"
        )
    if "lam" in given:
        raise ValueError(f"--pool-set lam: a pool's lam is fixed (pool {pool!r})")
    check_hyperparameters(pool, given)


def check_out(out: str, inputs: Sequence[str]) -> None:
    """Before any tensor is read: --out must not destroy anything (exit 2) and its folder
    must be writable (exit 1, an environment failure), so a long merge is not wasted."""
    try:
        path = vectors.check_output(out, inputs, what="--out")
        folder = vectors.existing_ancestor(path.parent)
        if not os.access(folder, os.W_OK | os.X_OK):
            code = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES
            raise OSError(code, os.strerror(code))
    except OSError as err:
        raise WriteError(f"cannot write {out}: {err.strerror or err}") from None


class WriteError(Exception):
    """The environment failed (read-only folder, full disk): exit 1, message already worded."""


def _describe(name: str) -> str:
    """Three lines per method: hyperparameters with defaults, paper, scope."""
    fn = methods.METHODS[name]
    paragraphs = [" ".join(p.split()) for p in (inspect.getdoc(fn) or "").split("\n\n")]
    source = next((p for p in paragraphs if p.startswith("Paper:")), "")
    paper, _, scope = source.partition(" Scope: ")
    params = ", ".join(
        f"{p.name}={p.default!r}" for p in list(inspect.signature(fn).parameters.values())[1:]
    )
    pad = " " * 18
    return f"{name:17s} {params}\n{pad}{paragraphs[0]}\n{pad}{paper}\n{pad}Scope: {scope}"


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("method", help="merge method name (see `mergeloom methods`)")
    sub.add_argument("--pretrained", required=True, help="pretrained weights (.safetensors)")
    sub.add_argument("--experts", required=True, nargs="+", help="fine-tuned weights")
    sub.add_argument("--out", required=True, help="output .safetensors (full merged weights)")
    sub.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="method hyperparameter, repeatable",
    )
    sub.add_argument(
        "--device",
        default="cpu",
        help="where the merge computes: cpu (the default), cuda, cuda:N or auto (CUDA when "
        "available). Files are read and written on the CPU and the device holds one key of "
        "every expert at a time; results differ from the CPU's by float rounding only",
    )


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``mergeloom: error:`` line too (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mergeloom: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mergeloom", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="list methods, hyperparameters and defaults")
    merge = commands.add_parser("merge", help="merge experts with one method")
    _common(merge)
    merge.add_argument("--lam", type=float, help="scaling factor (default: the method's)")
    woven = commands.add_parser("weave", help="Weight Weaving over a lambda search space")
    _common(woven)
    woven.add_argument("--lambdas", default="0.05:1.0:0.05", help="start:stop:step or a,b,c")
    woven.add_argument("--pool", default="mean", help=f"{', '.join(POOLS)} or a method name")
    woven.add_argument(
        "--pool-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="hyperparameter of a method used as the pool",
    )
    woven.add_argument(
        "--no-collaborative",
        dest="collaborative",
        action="store_false",
        help="pool only the merged candidates, not the raw task vectors",
    )
    woven.add_argument("--seed", type=int, default=0, help="seed of the random pool")
    _repro_parser(commands)
    return parser


def _repro_parser(commands: argparse._SubParsersAction) -> None:
    repro = commands.add_parser(
        "repro",
        help="dvc repro with independent stages at the same time, on Dask workers",
        description="Runs the stages of ./dvc.yaml (or TARGETS) as `dvc repro` would, each "
        "through `dvc --wait-for-lock repro --single-item`, independent ones at the same time "
        "(README: 'More than one GPU or machine').",
    )
    repro.add_argument("targets", nargs="*", help="stages or dvc.yaml files, as for dvc repro")
    repro.add_argument(
        "--jobs", "-j", type=int, default=1,
        help="local workers (CPU), or batch jobs with --cluster; default 1",
    )  # fmt: skip
    where = repro.add_mutually_exclusive_group()
    where.add_argument(
        "--gpus",
        help="one local worker per GPU, each stage pinned to its worker's GPU with "
        "CUDA_VISIBLE_DEVICES: a comma list of ids (0,1,2,3) or 'all'",
    )
    where.add_argument(
        "--cluster",
        metavar="CONFIG.yaml",
        help="a dask_jobqueue config (configs/cluster/slurm.yaml); --jobs batch jobs run the "
        "workers, on a filesystem shared with this folder",
    )


def run(args: argparse.Namespace) -> str:
    if args.command == "methods":
        return "\n".join(_describe(name) for name in methods.METHODS)
    if args.command == "repro":
        return _repro(args)
    hyperparameters, options = _checked(args)
    with compute_on(options.pop("device")):
        return _merge(args, hyperparameters, options)


def _merge(
    args: argparse.Namespace, hyperparameters: dict[str, object], options: dict[str, object]
) -> str:
    """The merge or weave of ``run``, on the compute device; the output file is written."""
    task_vectors = vectors.load_task_vectors(args.pretrained, args.experts)
    record: dict[str, object] = {
        "method": args.method,
        "hyperparameters": hyperparameters,
        "experts": [str(p) for p in args.experts],
    }
    if args.command == "merge":
        delta = methods.get(args.method)(task_vectors, **hyperparameters)
    else:
        lambdas, pool_hp = options["lambdas"], options["pool_hyperparameters"]
        delta = weave(
            args.method,
            task_vectors,
            {"lam": lambdas},
            args.pool,
            collaborative=args.collaborative,
            seed=args.seed,
            hyperparameters=hyperparameters,
            pool_hyperparameters=pool_hp,
        )
        record.update(
            options,
            pool=args.pool,
            collaborative=args.collaborative,
            seed=args.seed,
            effective_lam_mean_pool=effective_lam(len(task_vectors), lambdas, args.collaborative),
        )
    pretrained = task_vectors[0].pretrained
    merged = vectors.apply(pretrained, delta, inplace=True)
    try:
        vectors.save(merged, args.out, metadata=vectors.metadata_json(record))
    except OSError as err:
        raise WriteError(f"cannot write {args.out}: {err.strerror or err}") from None
    return f"wrote {args.out} ({len(merged)} tensors)"


def _checked(args: argparse.Namespace) -> tuple[dict[str, object], dict[str, object]]:
    """Every option checked before any tensor is read; (method hyperparameters, weave's)."""
    hyperparameters = parse_assignments(args.set, "--set")
    methods.get(args.method)
    options: dict[str, object] = {}
    if args.command == "merge" and args.lam is not None:
        if "lam" in hyperparameters:
            raise ValueError("lam given twice: use either --lam or --set lam=...")
        hyperparameters["lam"] = methods.check_lam(args.lam, "--lam")
    if args.command == "weave":
        if "lam" in hyperparameters:
            raise ValueError(
                f"weave: ['lam'] given both as fixed hyperparameters (--set lam="
                f"{hyperparameters['lam']}) and in the search space (--lambdas)"
            )
        options["lambdas"] = parse_lambdas(args.lambdas)
        options["pool_hyperparameters"] = parse_assignments(args.pool_set, "--pool-set")
        check_pool_hyperparameters(args.pool, options["pool_hyperparameters"])
    check_hyperparameters(args.method, hyperparameters)
    check_out(args.out, [args.pretrained, *args.experts])
    options["device"] = _device(args.device)
    return hyperparameters, options


def _device(name: str) -> torch.device:
    """--device resolved before any tensor is read: a bad name or absent CUDA is bad input."""
    try:
        return pick_device(name)
    except ValueError as err:  # its message starts "device 'name'..."
        raise ValueError(f"--{err}") from None


def _gpu_ids(text: str) -> list[str]:
    if text == "all":
        count = torch.cuda.device_count()
        if not count:
            raise ValueError("--gpus all: no CUDA device is visible; expected at least one")
        return [str(i) for i in range(count)]
    ids = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"--gpus {text!r}: expected distinct GPU ids such as 0,1,2,3 or 'all'")
    return ids


def _repro(args: argparse.Namespace) -> str:
    """Starts the cluster, runs the pipeline on it, and turns a failed stage into exit 1 with
    the stage named and the end of its log."""
    import logging

    from mergeloom import scheduler

    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: expected a number of workers >= 1")
    gpus = _gpu_ids(args.gpus) if args.gpus else []
    if gpus and args.jobs not in (1, len(gpus)):
        raise ValueError(f"--jobs {args.jobs} with --gpus {args.gpus}: one worker per GPU, "
                         f"expected --jobs {len(gpus)} or no --jobs")  # fmt: skip
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    scheduler.log.addHandler(handler)
    scheduler.log.setLevel(logging.INFO)
    from distributed import Client

    if args.cluster:
        cluster, resources = scheduler.jobqueue_cluster(args.cluster)
        cluster.scale(jobs=args.jobs)
        pinned = {}
    else:
        cluster, pinned, resources = scheduler.local_cluster(args.jobs, gpus)
    with cluster, Client(cluster) as client:
        outcome = scheduler.reproduce(client, args.targets, gpus=pinned, resources=resources)
    if outcome.ok:
        return (f"{len(outcome.ran)} stages ran, {len(outcome.restored)} restored from the "
                f"run-cache, {len(outcome.up_to_date)} up to date")  # fmt: skip
    for failed in outcome.failed:
        print(f"--- {failed.log} (last {scheduler.TAIL_LINES} lines)", file=sys.stderr)
        print(scheduler.log_tail(failed.log), file=sys.stderr)
    first = outcome.failed[0]
    raise StageFailed(
        f"stage {first.stage!r} failed (exit {first.returncode}, log {first.log})"
        + "".join(f", and {f.stage!r}" for f in outcome.failed[1:])
        + f"; not run, as they depend on it: {', '.join(outcome.not_run) or 'none'}; "
        "dvc.lock records none of them"
    )


class StageFailed(WriteError):
    """A pipeline stage failed (exit 1); the message names it, its log and what did not run."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input (ValueError, argparse), 1 on any other failure.

    Failures print one line ``mergeloom: error: ...`` to stderr, never a traceback; an
    unexpected one names its exception type.
    """
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except ValueError as err:
        print(f"mergeloom: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergeloom: error: interrupted", file=sys.stderr)
        return 130
    except WriteError as err:
        print(f"mergeloom: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # an input that cannot be read (permissions, I/O error)
        where = f"{err.filename}: " if err.filename else ""
        print(f"mergeloom: error: {where}{_one_line(err.strerror or err)}", file=sys.stderr)
        return 1
    except Exception as err:  # the CLI boundary: one line, not a traceback
        print(f"mergeloom: error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
