"""``mergeloom`` command line: merge or weave any safetensors state dicts (not only CLIP).

    mergeloom methods
    mergeloom merge ties --pretrained P.safetensors --experts A.safetensors B.safetensors \\
        --out M.safetensors [--lam 1.0] [--set k=0.2 ...]
    mergeloom weave ties --pretrained P.safetensors --experts A.safetensors B.safetensors \\
        --lambdas 0.05:1.0:0.05 --pool mean --out W.safetensors [--set k=0.2 ...] \\
        [--pool-set NAME=VALUE ...] [--no-collaborative] [--seed 0]

Exit status: 0 done, 2 bad input, 1 any other failure (one ``mergeloom: error:`` line).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence

import yaml

from mergeloom import methods, vectors
from mergeloom.weave import POOLS, effective_lam, weave


def parse_lambdas(text: str) -> list[float]:
    """'start:stop:step' (stop included) or a comma list, e.g. '0.05:1.0:0.05' -> 20 values."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0 or start > stop:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
            return [v for v in values if v <= stop + 1e-9]
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(
            f"--lambdas {text!r}: expected start:stop:step with step > 0 and start <= stop "
            "(e.g. 0.05:1.0:0.05) or a comma list (e.g. 0.1,0.3,0.5)"
        )
    return values


def parse_assignments(pairs: Sequence[str], option: str) -> dict[str, object]:
    """name=value pairs; values are read as YAML scalars (0.2, true, ties, [1, 2])."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"{option} {pair!r}: expected name=value")
        out[name.strip()] = yaml.safe_load(value)
    return out


def check_hyperparameters(name: str, given: Sequence[str]) -> None:
    allowed = list(inspect.signature(methods.get(name)).parameters)[1:]
    unknown = [g for g in given if g not in allowed]
    if unknown:
        raise ValueError(f"{name} has no hyperparameter {unknown}; it takes: {', '.join(allowed)}")


def check_pool_hyperparameters(pool: str, given: Sequence[str]) -> None:
    """--pool-set names: only a method used as the pool takes them, and never lam (fixed)."""
    if not given:
        return
    if pool not in POOLS and pool not in methods.METHODS:
        return  # weave's get_pool names the unknown pool
    if pool in POOLS:
        raise ValueError(
            f"--pool-set {list(given)}: pool {pool!r} takes no hyperparameters "
            "(--pool-set applies when --pool is a method name; the random pool's seed is --seed)"
        )
    if "lam" in given:
        raise ValueError(f"--pool-set lam: a pool's lam is fixed (pool {pool!r})")
    check_hyperparameters(pool, given)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeloom", description=__doc__.splitlines()[0])
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
    return parser


def run(args: argparse.Namespace) -> str:
    if args.command == "methods":
        return "\n".join(_describe(name) for name in methods.METHODS)
    hyperparameters = parse_assignments(args.set, "--set")
    check_hyperparameters(args.method, list(hyperparameters))
    task_vectors = vectors.load_task_vectors(args.pretrained, args.experts)
    record: dict[str, object] = {
        "method": args.method,
        "hyperparameters": hyperparameters,
        "experts": [str(p) for p in args.experts],
    }
    if args.command == "merge":
        if args.lam is not None:
            if "lam" in hyperparameters:
                raise ValueError("lam given twice: use either --lam or --set lam=...")
            hyperparameters["lam"] = args.lam
        delta = methods.get(args.method)(task_vectors, **hyperparameters)
    else:
        lambdas = parse_lambdas(args.lambdas)
        pool_hp = parse_assignments(args.pool_set, "--pool-set")
        check_pool_hyperparameters(args.pool, list(pool_hp))
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
            lambdas=lambdas,
            pool=args.pool,
            pool_hyperparameters=pool_hp,
            collaborative=args.collaborative,
            seed=args.seed,
            effective_lam_mean_pool=effective_lam(len(task_vectors), lambdas, args.collaborative),
        )
    pretrained = task_vectors[0].pretrained
    merged = vectors.apply(pretrained, delta, inplace=True)
    vectors.save(merged, args.out, metadata=vectors.metadata_json(record))
    return f"wrote {args.out} ({len(merged)} tensors)"


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
    except Exception as err:  # the CLI boundary: one line, not a traceback
        print(f"mergeloom: error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
