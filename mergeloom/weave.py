"""Weight Weaving: pool the merged updates over a hyperparameter search space, no data needed.

Chaves, Valle & Avila, 2025, "Weight Weaving: Parameter Pooling for Data-Free Model Merging",
arXiv:2510.13921. For every point of the search space (lam values by default, but any grid of
the method's hyperparameters) the base method gives a merged update; a pool combines them,
in the collaborative variant together with the raw task vectors.

A pool has the type of a merge method whose lam is fixed: mean = weight averaging,
random = random mixing, max_abs = MagMax, all at lam 1, and any registered method can pool.
Candidates are lazy mappings, so pooling reads one key of every candidate at a time:
  * lam-linear methods: D = method(lam=1) is computed once, candidate i is the view lam_i * D
    (docs/methods.md#closed-form); lam-affine (CART): m + lam_i * D with m = method(lam=0);
    the pools mean, random and max_abs run inside the pass that computes D, on each key's
    stack of task vectors (``methods.key_hook``), so weaving reads the experts once;
  * any other grid: each candidate is merged once and spilled to a temporary safetensors
    file, so at most one candidate model is in memory.
"""

from __future__ import annotations

import inspect
import itertools
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch

from mergeloom import methods
from mergeloom.vectors import SafetensorsFile, StateDict, TensorMap, save

Pool = Callable[[Sequence[TensorMap]], StateDict]

POOLS: dict[str, Pool] = {
    "mean": partial(methods.weight_averaging, lam=1.0),
    "random": partial(methods.random_mix, lam=1.0),
    "max_abs": partial(methods.magmax, lam=1.0),
}

# Methods whose output is a sum over inputs: as a pool their scale is 1/|A*|
# (docs/methods.md#closed-form).
_SUM_TYPE = frozenset({"task_arithmetic", "breadcrumbs", "consensus"})


class _Affine(Mapping[str, torch.Tensor]):
    """Lazy candidate ``offset + lam * direction`` (offset may be None)."""

    def __init__(self, offset: StateDict | None, direction: StateDict, lam: float):
        self.offset, self.direction, self.lam = offset, direction, lam

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.direction[key] * self.lam
        return value if self.offset is None else value + self.offset[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.direction)

    def __len__(self) -> int:
        return len(self.direction)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.direction[key].shape)


def is_sum_type(name: str, hyperparameters: Mapping[str, object]) -> bool:
    if name == "dare":
        return hyperparameters.get("base", "task_arithmetic") == "task_arithmetic"
    if name == "ties":
        return hyperparameters.get("merge", "mean") == "sum"
    return name in _SUM_TYPE


def get_pool(
    name: str,
    *,
    seed: int = 0,
    n_candidates: int,
    hyperparameters: Mapping[str, object] | None = None,
) -> Pool:
    """A pool by name: POOLS first, then any merge method at its fixed pooling scale.

    Args:
        seed: Seed of the random pool (and of seeded methods used as pools).
        n_candidates: |A*|, which sets the scale of sum-type methods used as pools.
        hyperparameters: The method's own hyperparameters (``lam`` is ignored).
    """
    if name == "random":
        return partial(methods.random_mix, lam=1.0, seed=seed)
    if name in POOLS:
        return POOLS[name]
    if name not in methods.METHODS:
        known = sorted(POOLS) + sorted(methods.METHODS)
        raise ValueError(f"unknown pool {name!r}; known: {', '.join(known)}")
    hp = {k: v for k, v in (hyperparameters or {}).items() if k != "lam"}
    if "seed" in inspect.signature(methods.METHODS[name]).parameters:
        hp.setdefault("seed", seed)
    lam = 1.0 / n_candidates if is_sum_type(name, hp) else 1.0
    return partial(methods.METHODS[name], lam=lam, **hp)


def expand_grid(search_space: Mapping[str, Sequence[object]]) -> list[dict[str, object]]:
    """Cartesian product of a {hyperparameter: values} search space, in the given order."""
    if not search_space:
        raise ValueError("weave: search space is empty; expected e.g. {'lam': [0.1, 0.2]}")
    empty = [name for name, values in search_space.items() if len(values) == 0]
    if empty:
        raise ValueError(f"weave: search space has no values for {empty}")
    names = list(search_space)
    return [
        dict(zip(names, point, strict=True))
        for point in itertools.product(*(search_space[n] for n in names))
    ]


def lambda_candidates(
    name: str,
    task_vectors: Sequence[TensorMap],
    lambdas: Sequence[float],
    hyperparameters: Mapping[str, object],
) -> list[_Affine]:
    method = methods.get(name)
    at_one = method(task_vectors, lam=1.0, **hyperparameters)
    return _views(at_one, _offset(name, task_vectors, hyperparameters), lambdas)


def _offset(
    name: str, task_vectors: Sequence[TensorMap], hyperparameters: Mapping[str, object]
) -> StateDict | None:
    """m = method(lam=0) of a lam-affine method; None for a lam-linear one."""
    if name in methods.LAMBDA_LINEAR:
        return None
    return methods.get(name)(task_vectors, lam=0.0, **hyperparameters)


def _views(at_one: StateDict, offset: StateDict | None, lambdas: Sequence[float]) -> list[_Affine]:
    """Candidates offset + lam_i * D from method(lam=1); D is taken in place of it."""
    if offset is not None:
        for key in at_one:  # D = method(lam=1) - method(lam=0)
            at_one[key] -= offset[key]
    return [_Affine(offset, at_one, lam) for lam in lambdas]


# ---------------------------------------------------------------- pools inside the method's pass


def _view(offset: torch.Tensor | None, direction: torch.Tensor, lam: float) -> torch.Tensor:
    """One candidate, computed as ``_Affine`` does (same rounding)."""
    value = direction * lam
    return value if offset is None else value + offset


def _mean_pool(
    raw: torch.Tensor | None,
    offset: torch.Tensor | None,
    direction: torch.Tensor,
    lambdas: Sequence[float],
) -> torch.Tensor:
    """Mean of the candidates in closed form: (sum_t tau_t + L m + sum(lam) D) / (T + L);
    equal to the explicit mean up to float rounding (summation order)."""
    total = direction * sum(lambdas)
    if offset is not None:
        total += offset * len(lambdas)
    if raw is not None:
        total += raw.sum(0)
    return total / (len(lambdas) + (0 if raw is None else len(raw)))


def _random_pool(
    raw: torch.Tensor | None,
    offset: torch.Tensor | None,
    direction: torch.Tensor,
    lambdas: Sequence[float],
    choice: torch.Tensor,
) -> torch.Tensor:
    """Per element the candidate ``choice`` (raw task vectors first, then the views in lambda
    order), without building the candidates: views as lam[choice] * D (+ m)."""
    n_raw = 0 if raw is None else len(raw)
    table = torch.tensor([0.0] * n_raw + list(lambdas), device=direction.device)
    view = direction * table.index_select(0, choice.reshape(-1)).view(choice.shape)
    if offset is not None:
        view += offset
    if raw is None:
        return view
    picked = raw.gather(0, choice.clamp(max=n_raw - 1)[None])[0]
    return methods.select(choice < n_raw, picked, view)


def _max_abs_pool(
    raw: torch.Tensor | None,
    offset: torch.Tensor | None,
    direction: torch.Tensor,
    lambdas: Sequence[float],
) -> torch.Tensor:
    """MagMax over the candidates (the later one wins ties). Views are monotone in lam
    (rounding is monotone), so over sorted lambdas the winning view is the first or the last
    one; otherwise every view is compared."""
    ascending = all(a <= b for a, b in itertools.pairwise(lambdas))
    descending = all(a >= b for a, b in itertools.pairwise(lambdas))
    ends = [lambdas[0], lambdas[-1]] if ascending or descending else lambdas
    views = [_view(offset, direction, lam) for lam in ends]
    if raw is None:
        return methods.largest_magnitude(views[0][None], *views[1:])
    return methods.largest_magnitude(raw, *views)


class _KeyPool:
    """Pool mean, random or max_abs of the lambda candidates, one key at a time, as the key
    hook of the base method (``methods.key_hook``): from the key's raw task vectors and
    D[key] = its update at lam 1. Same candidates, order and random draws as pooling
    ``lambda_candidates``; ``keys`` records which keys the method pooled."""

    def __init__(
        self,
        pool: str,
        lambdas: Sequence[float],
        offset: StateDict | None,
        collaborative: bool,
        seed: int,
    ):
        self.pool, self.lambdas, self.offset = pool, list(lambdas), offset
        self.collaborative, self.seed = collaborative, seed
        self.shapes: dict[str, torch.Size] = {}

    @property
    def keys(self) -> set[str]:
        return set(self.shapes)

    def __call__(
        self, key: str, stack: torch.Tensor, delta: torch.Tensor, index: torch.Tensor | None
    ) -> torch.Tensor:
        if index is None:
            self.shapes[key] = delta.shape
        offset, direction = None, delta
        if self.offset is not None:
            offset = self.offset[key].to(delta.device)
            offset = offset if index is None else offset.reshape(-1)[index]
            direction = delta - offset
        raw = stack if self.collaborative else None
        if self.pool == "mean":
            return _mean_pool(raw, offset, direction, self.lambdas)
        if self.pool == "max_abs":
            return _max_abs_pool(raw, offset, direction, self.lambdas)
        n_candidates = len(self.lambdas) + (len(stack) if self.collaborative else 0)
        choice = methods.random_choice(n_candidates, self.shapes[key], self.seed, key)
        choice = choice.to(delta.device)  # the draws of random_mix over the candidates
        choice = choice if index is None else choice.reshape(-1)[index]
        return _random_pool(raw, offset, direction, self.lambdas, choice)


def _pooled_in_one_pass(
    name: str,
    task_vectors: Sequence[TensorMap],
    lambdas: Sequence[float],
    pool: str,
    pool_fn: Pool,
    *,
    collaborative: bool,
    seed: int,
    hyperparameters: Mapping[str, object],
) -> StateDict:
    """Weight Weaving over lam with pool mean, random or max_abs, pooled inside the base
    method's pass; a method that does not call its key hook is pooled by ``pool_fn`` in a
    second pass."""
    if pool == "random":
        methods.check_hyperparameters("random_mix", {"seed": seed})
    offset = _offset(name, task_vectors, hyperparameters)
    pooler = _KeyPool(pool, lambdas, offset, collaborative, seed)
    with methods.key_hook(pooler):
        merged = methods.get(name)(task_vectors, lam=1.0, **hyperparameters)
    if pooler.keys == set(merged):
        return merged
    if pooler.keys:
        raise RuntimeError(f"weave: {name} pooled {len(pooler.keys)} of {len(merged)} keys")
    raw = list(task_vectors) if collaborative else []
    return pool_fn(raw + _views(merged, offset, lambdas))


def weave(
    method: str,
    task_vectors: Sequence[TensorMap],
    search_space: Mapping[str, Sequence],
    pool: str | Pool = "mean",
    *,
    collaborative: bool = True,
    seed: int = 0,
    closed_form: bool = True,
    spill_dir: str | Path | None = None,
    hyperparameters: Mapping[str, object] | None = None,
    pool_hyperparameters: Mapping[str, object] | None = None,
) -> StateDict:
    """Merged task vector of Weight Weaving with base ``method`` over ``search_space``.

    Args:
        search_space: {hyperparameter: values}; the grid is their Cartesian product.
        pool: A pool name (mean, random, max_abs or a method name) or a Pool.
        collaborative: Pool the raw task vectors together with the merged candidates.
        seed: Seed of the random pool.
        closed_form: Use the lam-linear/affine views when the grid is over lam only; False
            merges every candidate explicitly (same result, for checking).
        spill_dir: Where explicit candidates are spilled (default: system temp).
        hyperparameters: Fixed hyperparameters of ``method`` (a mapping, not keywords: a
            method's own ``seed`` must not collide with the pool's).
        pool_hyperparameters: Hyperparameters of a method used as the pool.
    """
    base = methods.get(method)
    hyperparameters = dict(hyperparameters or {})
    grid = expand_grid(search_space)
    both = sorted(set(search_space) & set(hyperparameters))
    if both:
        raise ValueError(
            f"weave: {both} given both as fixed hyperparameters and in the search space"
        )
    for point in grid:  # fail on a bad name before any heavy work
        inspect.signature(base).bind(task_vectors, **hyperparameters, **point)
    n_candidates = len(grid) + (len(task_vectors) if collaborative else 0)
    pool_fn = (
        pool
        if callable(pool)
        else get_pool(
            pool, seed=seed, n_candidates=n_candidates, hyperparameters=pool_hyperparameters
        )
    )
    raw = list(task_vectors) if collaborative else []
    if closed_form and set(search_space) == {"lam"}:
        lambdas = [float(point["lam"]) for point in grid]
        if isinstance(pool, str) and pool in POOLS:
            return _pooled_in_one_pass(
                method,
                task_vectors,
                lambdas,
                pool,
                pool_fn,
                collaborative=collaborative,
                seed=seed,
                hyperparameters=hyperparameters,
            )
        return pool_fn(raw + lambda_candidates(method, task_vectors, lambdas, hyperparameters))
    with tempfile.TemporaryDirectory(prefix="mergeloom-weave-", dir=spill_dir) as tmp:
        spilled = []
        for i, point in enumerate(grid):
            path = Path(tmp) / f"candidate_{i}.safetensors"
            save(base(task_vectors, **{**hyperparameters, **point}), path)
            spilled.append(SafetensorsFile(path))
        return pool_fn(raw + spilled)


def effective_lam(n_tasks: int, lambdas: Sequence[float], collaborative: bool) -> float:
    """lam_eff of mean pooling on a lam-linear base: report it beside WW.

    Closed form: docs/methods.md#closed-form.
    """
    total = len(lambdas) + (n_tasks if collaborative else 0)
    return sum(lambdas) / total
