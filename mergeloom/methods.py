"""Data-free merge methods: pure functions from task vectors to one merged task vector.

Contract (style.md 4.3): ``method(task_vectors, *, lam, **hyperparameters) -> StateDict``.
Inputs are mappings key -> tensor (in memory or lazy on disk), same keys and shapes, never
modified; the output has the same keys and shapes in float32. Each method touches one key of
every task vector at a time; global statistics (TIES top-k, PCB quantiles) are computed first
by streaming passes (``mergeloom.stats``), so T ViT-sized experts never sit in memory together.
"""

from __future__ import annotations

import inspect
import logging
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from mergeloom.device import compute_device
from mergeloom.progress import progress
from mergeloom.stats import order_statistics
from mergeloom.vectors import StateDict, TensorMap, check_compatible, shape_of

log = logging.getLogger(__name__)

Method = Callable[..., StateDict]


# ---------------------------------------------------------------- shared steps


KeyHook = Callable[[str, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_KEY_HOOK: ContextVar[KeyHook | None] = ContextVar("mergeloom_key_hook", default=None)


@contextmanager
def key_hook(hook: KeyHook) -> Iterator[None]:
    """Inside the block a method's output for each key is ``hook(key, stack, delta, None)``,
    not ``delta``: Weight Weaving pools a key while its task vectors are in memory, so the
    experts are read once.

    ``stack`` holds the key's raw task vectors (T, *shape), ``delta`` the merged update, both
    on the compute device. A method that revises entries after its pass (TIES's zero-sign
    coordinates) calls the hook again for them with ``index``, their flat positions, and
    ``stack`` (T, n) and ``delta`` (n,) holding those entries only. A method that merges other
    tensors than its inputs (DARE's dropped views) still gives the hook the raw ones.
    """
    token = _KEY_HOOK.set(hook)
    try:
        yield
    finally:
        _KEY_HOOK.reset(token)


class _Stacker:
    """(T, *shape) float32 stacks of one key on the compute device, in one reused buffer.

    A fresh allocation per key costs page faults (~0.5 s/GB here) that dominate simple merges;
    lazy task vectors read straight into the buffer (through a CPU row when computing on
    another device: files are read into CPU memory). A returned stack is valid until the next
    call, so callers derive new tensors from it and never keep it. ``finish`` turns a key's
    merged update into the method's output: on the CPU, through the key hook if one is set.
    """

    def __init__(self, task_vectors: Sequence[TensorMap]):
        self.task_vectors = task_vectors
        self.device = compute_device()
        self.hook = _KEY_HOOK.get()
        numel = max((math.prod(shape_of(task_vectors[0], k)) for k in task_vectors[0]), default=0)
        self.buffer = torch.empty(len(task_vectors) * numel, device=self.device)
        self.staging = torch.empty(numel) if self.device.type != "cpu" else None
        self.spare: torch.Tensor | None = None

    def __call__(self, key: str) -> torch.Tensor:
        shape = shape_of(self.task_vectors[0], key)
        stack = self.buffer[: len(self.task_vectors) * math.prod(shape)].view(-1, *shape)
        for row, tv in zip(stack, self.task_vectors, strict=True):
            fill = getattr(tv, "read_into", None)
            if fill is None:
                row.copy_(tv[key])
            elif self.staging is None:
                fill(key, row)
            else:
                staged = self.staging[: row.numel()].view(row.shape)
                fill(key, staged)
                row.copy_(staged)
        return stack  # (T, *shape)

    def writable(self, stack: torch.Tensor) -> torch.Tensor:
        """``stack`` for a method to overwrite: itself, or a copy while the hook needs it."""
        if self.hook is None:
            return stack
        if self.spare is None:
            self.spare = torch.empty_like(self.buffer)
        return self.spare[: stack.numel()].view(stack.shape).copy_(stack)

    def finish(
        self, key: str, stack: torch.Tensor, delta: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The output for ``key`` on the CPU: ``delta``, or the hook's value from the raw
        ``stack`` and ``delta`` (see ``key_hook``)."""
        out = delta if self.hook is None else self.hook(key, stack, delta, index)
        return out.cpu()


def _prepare(task_vectors: Sequence[TensorMap], name: str) -> tuple[list[str], _Stacker]:
    """Validate the inputs; return their keys and the per-key stacker."""
    if len(task_vectors) == 0:
        raise ValueError(f"{name}: expected at least one task vector, got none")
    check_compatible(task_vectors, names=[f"task vector {i}" for i in range(len(task_vectors))])
    return list(task_vectors[0]), _Stacker(task_vectors)


def _progress(keys: Sequence[str], desc: str) -> Iterator[str]:
    return progress(keys, desc=desc, unit="tensor", leave=False)


def _check_range(
    name: str,
    param: str,
    value: float,
    low: float,
    high: float,
    *,
    closed_low: bool,
    closed_high: bool = True,
) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok_low = number and (value >= low if closed_low else value > low)
    ok_high = number and (value <= high if closed_high else value < high)
    if not (ok_low and ok_high and math.isfinite(value)):
        interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
        raise ValueError(f"{name}: {param} must be in {interval}, got {value!r}")


def _check_choice(name: str, param: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {param} must be one of {list(allowed)}, got {value!r}")


def _check_lam(name: str, lam: float) -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"{name}: lam must be a finite number, got {lam!r}")


def _check_int(name: str, param: str, value: object, minimum: int | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (minimum is not None and value < minimum)
    ):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name}: {param} must be an integer{bound}, got {value!r}")


def key_seed(seed: int, *parts: object) -> int:
    """Seed for one (seed, ..., key) so random draws ignore key order and process (not hash())."""
    return zlib.crc32("/".join(str(p) for p in (seed, *parts)).encode())


def _generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(key_seed(seed, *parts))


def _numel(task_vector: TensorMap, keys: Sequence[str]) -> int:
    return sum(math.prod(shape_of(task_vector, k)) for k in keys)


def _groups(keys: Sequence[str], scope: str) -> list[list[str]]:
    """Key groups over which global statistics are taken."""
    return [list(keys)] if scope == "global" else [[k] for k in keys]


def _is_matrix(key: str, shape: Sequence[int]) -> bool:
    """2-D parameters get SVD treatment in TSV/Iso; text_projection is excluded as in their code."""
    return len(shape) == 2 and "text_projection" not in key


# Smallest eigenvalue of a float64 Gram matrix, relative to its largest, that the Gram route
# below trusts (singular values >= 1e-4 s_1): its rounding (~1e-16 lambda_1 per entry) then
# moves every used direction by < 1e-7, below a float32 SVD's own error. Below it: the SVD.
_GRAM_MIN_RATIO = 1e-8


def _gram_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigenvalues (descending) and eigenvectors of the smaller Gram matrix of ``a``, and
    whether it is the left one (A A^T, for a wide ``a``) or the right one (A^T A)."""
    wide = a.shape[0] <= a.shape[1]
    values, vectors = torch.linalg.eigh(a @ a.mT if wide else a.mT @ a)
    return values.flip(0), vectors.flip(1), wide


def _top_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k leading singular triplets (u (m, k), s (k,), vh (k, n)) of a matrix, in float64.

    TSV-M, Iso-CTS and CART keep a fraction of each spectrum, and a float64 eigendecomposition
    of the r x r Gram matrix costs ~1/6 of a float32 SVD of a 768 x 3072 matrix on the CPU
    while matching a float64 SVD to ~1e-7 (closer than the float32 SVD the authors use).
    Where s_k < 1e-4 s_1 (rank below k, a zero matrix) the float32 SVD, as the authors.
    """
    a = matrix.double()
    if k == 0:
        return a.new_zeros(a.shape[0], 0), a.new_zeros(0), a.new_zeros(0, a.shape[1])
    values, vectors, wide = _gram_eigh(a)
    values, vectors = values[:k], vectors[:, :k]
    if values[-1] > _GRAM_MIN_RATIO * values[0]:
        s = values.sqrt()
        if wide:
            return vectors, s, (vectors.mT @ a) / s[:, None]
        return (a @ vectors) / s, s, vectors.mT
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k].double(), s[:k].double(), vh[:k].double()


def _polar(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest matrix with orthonormal columns (or rows), P Q^T of the SVD P S Q^T, and S
    (descending), in float64.

    P Q^T = A (A^T A)^(-1/2) (or (A A^T)^(-1/2) A) from the float64 eigendecomposition of the
    smaller Gram matrix, as exact as the SVD while A is well conditioned (s_min >= 1e-4 s_max,
    see ``_GRAM_MIN_RATIO``); otherwise the float32 SVD, whose P Q^T is then barely defined.
    """
    a = matrix.double()
    values, vectors, wide = _gram_eigh(a)
    if values[-1] > _GRAM_MIN_RATIO * values[0]:
        s = values.sqrt()
        inverse_root = (vectors / s) @ vectors.mT
        return (inverse_root @ a if wide else a @ inverse_root), s
    p, s, qh = torch.linalg.svd(matrix, full_matrices=False)
    return (p @ qh).double(), s.double()


def _mean_or_matrix(
    task_vectors: Sequence[TensorMap],
    lam: float,
    name: str,
    matrix_merge: Callable[[str, torch.Tensor], torch.Tensor],
) -> StateDict:
    """SVD-family layout: ``matrix_merge`` on 2-D keys, the mean of the task vectors elsewhere."""
    merged = {}
    keys, stack_of = _prepare(task_vectors, name)
    for key in _progress(keys, name):
        stack = stack_of(key)  # (T, *shape)
        delta = matrix_merge(key, stack) if _is_matrix(key, stack.shape[1:]) else stack.mean(0)
        merged[key] = stack_of.finish(key, stack, delta * lam)
    return merged


# ---------------------------------------------------------------- averaging family


def weight_averaging(task_vectors: Sequence[TensorMap], *, lam: float = 1.0) -> StateDict:
    """Uniform weight averaging (model soup): theta_0 + lam * mean(tau).

    Paper: Wortsman et al., 2022, "Model soups", arXiv:2203.05482. Scope: per-tensor
    (element-wise). lam = 1 is plain averaging (= Task Arithmetic at lam = 1/T).
    """
    _check_lam("weight_averaging", lam)
    merged = {}
    keys, stack_of = _prepare(task_vectors, "weight_averaging")
    for key in _progress(keys, "weight_averaging"):
        stack = stack_of(key)
        merged[key] = stack_of.finish(key, stack, stack.mean(0) * lam)
    return merged


def task_arithmetic(task_vectors: Sequence[TensorMap], *, lam: float = 0.3) -> StateDict:
    """Task Arithmetic: lam * sum(tau).

    Paper: Ilharco et al., 2023, "Editing models with task arithmetic", arXiv:2212.04089.
    Scope: per-tensor (element-wise). Default lam 0.3 as FusionBench's data-free default.
    """
    _check_lam("task_arithmetic", lam)
    merged = {}
    keys, stack_of = _prepare(task_vectors, "task_arithmetic")
    for key in _progress(keys, "task_arithmetic"):
        stack = stack_of(key)
        merged[key] = stack_of.finish(key, stack, stack.sum(0) * lam)
    return merged


# ---------------------------------------------------------------- sign / sparsity family


def _check_frozen_zeros(name: str, frozen_zeros: int, scope: str) -> None:
    _check_int(name, "frozen_zeros", frozen_zeros, 0)
    if frozen_zeros and scope != "global":
        raise ValueError(f"{name}: frozen_zeros needs scope='global', got scope={scope!r}")


def _union_order_statistics(
    chunks: Callable[[], Iterator[torch.Tensor]],
    ranks: Sequence[Sequence[int]],
    count: int,
    zeros: int = 0,
    negatives: Sequence[int] | None = None,
) -> list[list[float]]:
    """Values at 0-based ``ranks`` of each row as if ``zeros`` zeros were appended to it.

    Rows hold ``count`` real values; ``negatives[r]`` counts the real values < 0 of row r
    (None: none, e.g. magnitudes). In the sorted union the zeros sit right after the
    negatives, so each rank maps to a rank of the real values or to 0.
    """
    negatives = negatives if negatives is not None else [0] * len(ranks)
    real: list[list[int]] = []
    for row_ranks, n_neg in zip(ranks, negatives, strict=True):
        real.append(
            [q if q < n_neg else q - zeros for q in row_ranks if not n_neg <= q < n_neg + zeros]
        )
    found = order_statistics(chunks, real, count=count) if any(real) else [[] for _ in ranks]
    out = []
    for row_ranks, n_neg, values in zip(ranks, negatives, found, strict=True):
        it = iter(values)
        out.append([0.0 if n_neg <= q < n_neg + zeros else next(it) for q in row_ranks])
    return out


def _trim_threshold(
    magnitudes: Callable[[], Iterator[torch.Tensor]], d: int, k: float, zeros: int, rule: str
) -> float:
    """Magnitude threshold of one task vector (keep |tau| >= it), over d real + zeros entries.

    rule "ties" (TIES code): the (D - int(D k))-th smallest of D = d + zeros magnitudes.
    rule "mergelm" (MergeLM's TIES, used for DARE-TIES): the int(D (1 - k))-th smallest;
    the two differ when D k is not an integer (MergeLM then keeps one entry more).
    """
    total = d + zeros
    kth = total - int(total * k) if rule == "ties" else int(total * (1.0 - k))  # 1-based
    if kth <= 0:
        return 0.0
    return _union_order_statistics(magnitudes, [[kth - 1]], count=d, zeros=zeros)[0][0]


def _disjoint_merge(
    trimmed: torch.Tensor, elected: torch.Tensor, merge: str, rule: str = "ties"
) -> torch.Tensor:
    """TIES step 3 on a (T, ...) stack: merge the entries whose sign is the elected one.

    An elected sign of 0 (zero-sum coordinate whose majority sign is also 0) keeps the
    negative entries under rule "ties" (the TIES code: ``where(sign > 0, x > 0, x < 0)``) and
    none under rule "mergelm". Modifies ``trimmed`` in place (it is a scratch stack)."""
    if rule == "ties":
        agrees = torch.where(elected > 0, trimmed > 0, trimmed < 0)
    else:
        agrees = (trimmed * elected) > 0  # same nonzero sign
    selected = trimmed.masked_fill_(~agrees, 0.0)
    if merge == "sum":
        return selected.sum(0)
    if merge == "max":
        return elected * selected.abs().amax(0)
    return selected.sum(0) / agrees.sum(0).clamp(min=1)


def _trim(stack: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """TIES step 1, in place on the scratch stack: keep |tau| >= the task's threshold."""
    view = thresholds.view(-1, *([1] * (stack.dim() - 1)))
    return stack.masked_fill_(stack.abs() < view, 0.0)


def ties(
    task_vectors: Sequence[TensorMap],
    *,
    lam: float = 1.0,
    k: float = 0.2,
    merge: str = "mean",
    scope: str = "global",
    frozen_zeros: int = 0,
) -> StateDict:
    """TIES-Merging: trim to top-k magnitudes, elect signs by mass, disjoint merge.

    Paper: Yadav et al., 2023, arXiv:2306.01708. Scope: global (top-k and the majority sign
    used for zero-sum coordinates are taken over the whole flattened vector, as in the
    reference code) or per-tensor on request. Threshold: the (D - int(D k))-th smallest
    magnitude, |tau| >= it kept (ties at it keep more than k). A coordinate whose summed sign
    is 0 gets the majority sign; if that is 0 too, its negative entries are merged (as the
    reference code's ``where(sign > 0, x > 0, x < 0)`` does).

    Args:
        k: Fraction of entries kept per task vector, in (0, 1].
        merge: "mean" (dis-mean, the paper), "sum" (dis-sum) or "max" (dis-max).
        scope: "global" or "per_tensor".
        frozen_zeros: Number of zero entries counted in the global top-k as if appended to
            every task vector (scope "global" only). The reference code flattens the whole
            CLIP state dict, frozen text tower included (25,599,489 zeros on ViT-B/32), so
            its k = 0.2 keeps 25.8 % of the 87,849,216 visual entries; pass that count to
            reproduce it. Default 0: k is the fraction of the entries actually merged, which
            does not depend on what else the checkpoint happens to store.
    """
    return _ties(task_vectors, lam, k, merge, scope, frozen_zeros, rule="ties", name="ties")


def _ties(
    task_vectors: Sequence[TensorMap],
    lam: float,
    k: float,
    merge: str,
    scope: str,
    frozen_zeros: int,
    *,
    rule: str,
    name: str,
) -> StateDict:
    _check_lam(name, lam)
    _check_range(name, "k", k, 0.0, 1.0, closed_low=False)
    _check_choice(name, "merge", merge, ("mean", "sum", "max"))
    _check_choice(name, "scope", scope, ("global", "per_tensor"))
    _check_frozen_zeros(name, frozen_zeros, scope)
    keys, stack_of = _prepare(task_vectors, name)
    merged = {}
    for group in _groups(keys, scope):
        d = _numel(task_vectors[0], group)
        thresholds = torch.tensor(
            [
                _trim_threshold(
                    lambda tv=tv, group=group: (tv[key].abs() for key in group),
                    d,
                    k,
                    frozen_zeros,
                    rule,
                )
                for tv in task_vectors
            ],
            device=stack_of.device,
        )
        # One pass: coordinates whose summed sign is exactly 0 but hold entries wait for the
        # majority sign of the whole group (reference `resolve_zero_signs`); they are rare.
        # Frozen zeros elect sign 0 and leave the majority unchanged.
        mass, pending = 0.0, []
        # The raw stack stays intact for a key hook (``writable``), which gets it and then the
        # raw entries of the pending coordinates.
        for key in _progress(group, name) if scope == "global" else group:
            stack = stack_of(key)
            trimmed = _trim(stack_of.writable(stack), thresholds)  # (T, *shape)
            elected = torch.sign(trimmed.sum(0))
            mass += float(elected.sum())
            flat, zero = trimmed.reshape(len(trimmed), -1), (elected == 0).view(-1).nonzero()[:, 0]
            undecided = zero[(flat[:, zero] != 0).any(0)]
            if len(undecided):
                raw = stack.reshape(len(stack), -1)[:, undecided]
                pending.append((key, undecided, flat[:, undecided], raw))
            delta = _disjoint_merge(trimmed, elected, merge, rule) * lam
            merged[key] = stack_of.finish(key, stack, delta)
        majority = torch.sign(torch.tensor(mass, device=stack_of.device))
        for key, index, entries, raw in pending:
            delta = _disjoint_merge(entries, majority, merge, rule) * lam
            merged[key].view(-1)[index.cpu()] = stack_of.finish(key, raw, delta, index)
    return merged


class _Dropped(Mapping[str, torch.Tensor]):
    """DARE view of one task vector: a seeded Bernoulli mask per key, rescaled by 1/(1-p)."""

    def __init__(self, tv: TensorMap, p: float, seed: int, task: int, rescale: bool):
        self.tv, self.p, self.seed, self.task, self.rescale = tv, p, seed, task, rescale

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.tv[key]
        keep = torch.rand(value.shape, generator=_generator(self.seed, self.task, key)) >= self.p
        value = value * keep
        return value / (1.0 - self.p) if self.rescale else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.tv)

    def __len__(self) -> int:
        return len(self.tv)

    def shape(self, key: str) -> tuple[int, ...]:
        return shape_of(self.tv, key)


def dare(
    task_vectors: Sequence[TensorMap],
    *,
    lam: float = 0.3,
    p: float = 0.5,
    base: str = "task_arithmetic",
    k: float = 0.2,
    seed: int = 0,
    rescale: bool = True,
) -> StateDict:
    """DARE: drop each entry with probability p, rescale by 1/(1-p), then merge with `base`.

    Paper: Yu et al., 2024, "Language Models are Super Mario", arXiv:2311.03099.
    Scope: element-wise masks (per-tensor); the TIES base keeps its global top-k.
    Masks are seeded per (seed, task, key), so results ignore key order. The TIES base
    follows the DARE authors' code (MergeLM ``ties_merging``), not the TIES code: the trim
    threshold is the int(d (1 - k))-th smallest magnitude (|tau| >= it kept; one entry more
    than TIES's d - int(d k) rule when d k is not an integer), and a coordinate whose elected
    sign stays 0 keeps no entry.

    Args:
        p: Drop rate in [0, 1).
        base: "task_arithmetic" (DARE-TA) or "ties" (DARE-TIES).
        k: TIES keep fraction when base is "ties".
        seed: Mask seed.
        rescale: Divide kept entries by 1 - p.
    """
    _check_lam("dare", lam)
    _check_range("dare", "p", p, 0.0, 1.0, closed_low=True, closed_high=False)
    _check_choice("dare", "base", base, ("task_arithmetic", "ties"))
    _check_range("dare", "k", k, 0.0, 1.0, closed_low=False)
    _check_int("dare", "seed", seed)
    _check_choice("dare", "rescale", rescale, (True, False))
    _prepare(task_vectors, "dare")
    dropped = [_Dropped(tv, p, seed, t, rescale) for t, tv in enumerate(task_vectors)]

    def merge_dropped() -> StateDict:
        if base == "ties":
            return _ties(dropped, lam, k, "mean", "global", 0, rule="mergelm", name="dare")
        return task_arithmetic(dropped, lam=lam)

    hook = _KEY_HOOK.get()
    if hook is None:
        return merge_dropped()
    raw_of = _Stacker(task_vectors)  # a key hook pools the raw task vectors: read them again

    def raw_hook(key: str, _: torch.Tensor, delta: torch.Tensor, index: torch.Tensor | None):
        raw = raw_of(key)
        raw = raw if index is None else raw.reshape(len(raw), -1)[:, index]
        return hook(key, raw, delta, index)

    with key_hook(raw_hook):
        return merge_dropped()


def _rank_at_least(magnitudes: torch.Tensor, rank: int) -> torch.Tensor:
    """Mask of entries whose rank in a stable ascending sort of each row (last dim) is >= rank.

    Same answer as ranking with ``argsort(stable=True, dim=-1)``, in O(n) with one batched
    kthvalue: entries tied at a row's cut value are ranked by position, so the kept count of
    every row is exact.
    """
    n = magnitudes.shape[-1]
    if rank <= 0:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if rank >= n:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    cut = magnitudes.kthvalue(rank + 1, dim=-1, keepdim=True).values  # value at 0-based rank
    tied = magnitudes == cut
    n_below = (magnitudes < cut).sum(-1, keepdim=True)
    # tied entries take ranks n_below, n_below + 1, ... in position order
    return (magnitudes > cut) | (tied & (tied.cumsum(-1) - 1 + n_below >= rank))


def _band_mask(values: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Whole-tensor band (mergekit semantics): drop the top gamma and the bottom rest."""
    n = values.numel()
    if gamma >= 1.0 - density:
        n_top, n_bottom = round((1.0 - density) * n), 0
    else:
        n_top, n_bottom = round(gamma * n), round((1.0 - density - gamma) * n)
    magnitudes = values.abs().flatten()
    keep = _rank_at_least(magnitudes, n_bottom) & ~_rank_at_least(magnitudes, n - n_top)
    return keep.view(values.shape)


def _row_band_mask(values: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs authors' mask, per row over the last dim of an (..., n) tensor.

    Their ``TaskVectorMiddleKeep`` (remove first): zero the int(n gamma) largest magnitudes
    of each row, then keep the int(n density) largest of what is left; 0-D tensors are
    returned untouched (all kept).
    """
    if values.dim() == 0:
        return torch.ones_like(values, dtype=torch.bool)
    n = values.shape[-1]
    n_top, n_keep = int(n * gamma), int(n * density)
    n_bottom = max(0, n - n_top - n_keep)
    magnitudes = values.abs()
    return _rank_at_least(magnitudes, n_bottom) & ~_rank_at_least(magnitudes, n - n_top)


def breadcrumbs(
    task_vectors: Sequence[TensorMap],
    *,
    lam: float = 0.2,
    density: float = 0.15,
    gamma: float = 0.006,
    scope: str = "row",
) -> StateDict:
    """Model Breadcrumbs: drop each row's largest outliers and smallest entries, then sum.

    Paper: Davari & Belilovsky, 2024, arXiv:2312.06795. Scope "row" (default, the authors'
    code): per task and per row of every tensor (the last dimension), remove the int(n gamma)
    largest magnitudes, then keep the int(n density) largest of the rest; 0-D tensors are
    left untouched. Scope "tensor": ranks over the whole tensor with mergekit semantics
    (``round`` counts; if gamma >= 1 - density only the top 1 - density is removed).
    Defaults: the starting point of the authors' hyperparameter search for this method
    (``find_best_hyperparam.py``, middle_keep: alpha 0.2, beta 0.15, gamma 0.006; searched
    ranges alpha 0.01-1, beta 0.05-0.20, gamma 0.001-0.01).

    Args:
        density: Fraction of entries kept per row (tensor), in (0, 1] (the authors' beta).
        gamma: Fraction of largest magnitudes removed, in [0, 1).
        scope: "row" (the authors) or "tensor".
    """
    _check_lam("breadcrumbs", lam)
    _check_range("breadcrumbs", "density", density, 0.0, 1.0, closed_low=False)
    _check_range("breadcrumbs", "gamma", gamma, 0.0, 1.0, closed_low=True, closed_high=False)
    _check_choice("breadcrumbs", "scope", scope, ("row", "tensor"))
    mask_of = _row_band_mask if scope == "row" else _band_mask
    merged = {}
    keys, stack_of = _prepare(task_vectors, "breadcrumbs")
    for key in _progress(keys, "breadcrumbs"):
        stack = stack_of(key)
        masked = stack_of.writable(stack)
        for task in masked:  # in place, one task at a time: no (T, *shape) temporaries
            task.mul_(mask_of(task, density, gamma))
        merged[key] = stack_of.finish(key, stack, masked.sum(0) * lam)
    return merged


def magmax(task_vectors: Sequence[TensorMap], *, lam: float = 0.5) -> StateDict:
    """MagMax: per element, the entry of largest magnitude (later task wins ties).

    Paper: Marczak et al., 2024, arXiv:2407.06322. Scope: element-wise.
    """
    _check_lam("magmax", lam)
    merged = {}
    keys, stack_of = _prepare(task_vectors, "magmax")
    for key in _progress(keys, "magmax"):
        stack = stack_of(key)
        merged[key] = stack_of.finish(key, stack, largest_magnitude(stack) * lam)
    return merged


def largest_magnitude(stack: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """Per element, the entry of largest magnitude among the rows of ``stack`` (T, ...) and
    then ``more`` (each shaped like a row); the later row wins ties (MagMax's rule, also Weight
    Weaving's max_abs pool).

    The winner is the max or the min, told apart by the sign of their sum (exact: a float sum
    is 0 only for x = -y). Where they tie in magnitude with opposite signs (0 and -0 too) or
    the sum is NaN, the row order decides: those few entries go through the running rule.
    """
    high, low = stack.amax(0), stack.amin(0)  # aminmax over dim 0 is slower here
    for row in more:
        torch.maximum(high, row, out=high)
        torch.minimum(low, row, out=low)
    total = high + low
    best = select(total >= 0, high, low)
    unsure = (total.abs() > 0).logical_not_()  # a sum of 0 or NaN
    if unsure.any():
        rows = [stack[:, unsure], *(row[unsure][None] for row in more)]
        best[unsure] = _running_largest_magnitude(torch.cat(rows))
    return best


def select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, a, b)`` for float32 ``a`` and ``b`` of one shape, by bit masks: the
    same bits, ~4x faster than torch.where's CPU kernel here (a hot step of MagMax, random
    mixing and Weight Weaving's pools)."""
    a_bits, b_bits = a.view(torch.int32), b.view(torch.int32)
    ones = mask.to(torch.int32).neg_()  # every bit set where mask holds
    return b_bits.bitwise_xor(a_bits).bitwise_and_(ones).bitwise_xor_(b_bits).view(torch.float32)


def _running_largest_magnitude(stack: torch.Tensor) -> torch.Tensor:
    best = stack[0].clone()
    best_abs = best.abs()
    for candidate in stack[1:]:  # ">=": the later task wins ties
        magnitude = candidate.abs()
        take = magnitude >= best_abs
        torch.where(take, candidate, best, out=best)
        torch.where(take, magnitude, best_abs, out=best_abs)
    return best


def random_mix(task_vectors: Sequence[TensorMap], *, lam: float = 1.0, seed: int = 0) -> StateDict:
    """Random mixing: per element, the entry of a uniformly drawn task.

    Paper: Marczak et al., 2024 (MagMax baseline), arXiv:2407.06322. Scope: element-wise;
    seeded per (seed, key), so results ignore key order and device.

    Args:
        seed: Selection seed.
    """
    _check_lam("random_mix", lam)
    _check_int("random_mix", "seed", seed)
    merged = {}
    keys, stack_of = _prepare(task_vectors, "random_mix")
    for key in _progress(keys, "random_mix"):
        stack = stack_of(key)
        choice = random_choice(stack.shape[0], stack.shape[1:], seed, key).to(stack.device)
        merged[key] = stack_of.finish(key, stack, stack.gather(0, choice[None])[0] * lam)
    return merged


def random_choice(n: int, shape: Sequence[int], seed: int, key: str) -> torch.Tensor:
    """Per element a uniform index in [0, n), drawn on the CPU from the (seed, key) seed, so
    draws ignore key order and device (random mixing, Weight Weaving's random pool). int32:
    the same draws as int64 (below 2**32 choices) at half the cost."""
    return torch.randint(n, tuple(shape), generator=_generator(seed, key), dtype=torch.int32)


def consensus(
    task_vectors: Sequence[TensorMap], *, lam: float = 0.3, tall_lambda: float = 0.4, k: int = 2
) -> StateDict:
    """Consensus Task Arithmetic: keep entries that the TALL masks of >= k tasks use.

    Paper: Wang et al., 2024, "Localizing Task Information for Improved Model Merging and
    Compression", arXiv:2405.07813. Scope: element-wise. Data-free variant: one fixed
    tall_lambda for all tasks instead of per-task validation.

    Args:
        tall_lambda: TALL mask threshold, >= 0.
        k: Minimum number of tasks using an entry (0 gives Task Arithmetic).
    """
    _check_lam("consensus", lam)
    _check_range("consensus", "tall_lambda", tall_lambda, 0.0, math.inf, closed_low=True)
    _check_int("consensus", "k", k, 0)
    merged = {}
    keys, stack_of = _prepare(task_vectors, "consensus")
    for key in _progress(keys, "consensus"):
        stack = stack_of(key)
        total = stack.sum(0)
        used = stack.abs() > tall_lambda * (total - stack).abs()  # TALL mask per task
        merged[key] = stack_of.finish(key, stack, total * (used.sum(0) >= k) * lam)
    return merged


# Entries per task in one PCB step. PCB's balance makes ~20 (T, n) temporaries: on a whole
# 768 x 3072 key (75 MB each at T = 8) they miss the cache and page-fault, on 16384-column
# chunks they stay in cache (~7x faster here) and bound the memory.
_PCB_CHUNK = 1 << 14


def _column_chunks(stack: torch.Tensor) -> Iterator[torch.Tensor]:
    """(T, <= _PCB_CHUNK) column slices of a (T, *shape) stack seen as (T, numel)."""
    flat = stack.reshape(len(stack), -1)
    return (flat[:, i : i + _PCB_CHUNK] for i in range(0, flat.shape[1], _PCB_CHUNK))


def _pcb_balance(
    chunk: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PCB's balance weights (T, n) of a (T, n) chunk and its clipped entries sign * |tau|.

    beta_i = exp(T norm_i^2) sum_j tanh(s_i s_j), norm the magnitude clipped to [low, high]
    (T, 1) and min-max normalised, s = sign * norm. (Computing each symmetric tanh term once
    takes gathers that cost more here than the T (T - 1) / 2 tanh they save.)
    """
    n_tasks = len(chunk)
    sign = torch.sign(chunk)
    clipped = chunk.abs().clamp(low, high)
    norm = (clipped - low) / (high - low).clamp(min=1e-12)
    signed = sign * norm
    inter = sum(torch.tanh(signed * signed[j]) for j in range(n_tasks))
    beta = torch.exp(n_tasks * norm**2) * inter
    return beta, sign * clipped


def _pcb_merge(
    chunk: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    floor: torch.Tensor,
    top: torch.Tensor,
) -> torch.Tensor:
    """PCB's merged entries (n,) of a (T, n) chunk: the clipped entries averaged with their
    balance weights scaled from each task's floor (weight 0, and 0 below) to its top (T, 1)."""
    beta, clipped = _pcb_balance(chunk, low, high)
    weights = (beta.maximum(floor) - floor) / (top - floor).clamp(min=1e-12)
    return (clipped * weights).sum(0) / weights.sum(0).clamp(min=1e-12)


def pcb(
    task_vectors: Sequence[TensorMap],
    *,
    lam: float = 1.2,
    ratio: float = 0.05,
    clip: float = 0.01,
    scope: str = "global",
    frozen_zeros: int = 0,
) -> StateDict:
    """PCB-Merging: intra- and inter-task balancing weights, keep the top ratio, weighted mean.

    Paper: Du et al., 2024, "Parameter Competition Balancing for Model Merging",
    arXiv:2410.02396. Scope: global (bounds and min-max over each whole flattened task
    vector, as the vision code) or per-tensor. Inter term: sum_j tanh(s_i * s_j) (ES script).
    Bounds are order statistics of the D entries of a row, as in the authors' ``clamp``:
    magnitudes are clipped to the values of 0-based ranks int(D clip) and
    int(D (1 - clip) - 1), and balance weights below the value of rank int(D (1 - ratio))
    get weight 0 (the entry at that rank too), the top one weight 1.

    Args:
        ratio: Fraction of entries kept per task, in (0, 1].
        clip: Fraction of magnitudes clipped at each end, in [0, 0.5).
        scope: "global" or "per_tensor".
        frozen_zeros: Number of zero entries counted in the global statistics as if appended
            to every task vector (scope "global" only); see ``ties``. The authors' vision code
            flattens the whole CLIP state dict, frozen text tower included (25,599,489 zeros
            on ViT-B/32); pass that count to reproduce it. Default 0: the statistics cover
            the merged entries only.
    """
    _check_lam("pcb", lam)
    _check_range("pcb", "ratio", ratio, 0.0, 1.0, closed_low=False)
    _check_range("pcb", "clip", clip, 0.0, 0.5, closed_low=True, closed_high=False)
    _check_choice("pcb", "scope", scope, ("global", "per_tensor"))
    _check_frozen_zeros("pcb", frozen_zeros, scope)
    keys, stack_of = _prepare(task_vectors, "pcb")
    n_tasks = len(task_vectors)
    merged = {}
    for group in _groups(keys, scope):
        d = _numel(task_vectors[0], group)
        total = d + frozen_zeros
        clip_ranks = [int(total * clip), int(total * (1 - clip) - 1)]

        def chunks(group=group) -> Iterator[torch.Tensor]:
            for key in group:
                yield from _column_chunks(stack_of(key))

        bounds = torch.tensor(
            _union_order_statistics(
                lambda: (chunk.abs() for chunk in chunks()),
                [clip_ranks] * n_tasks,
                count=d,
                zeros=frozen_zeros,
            ),
            device=stack_of.device,
        )  # (T, 2)
        low, high = bounds[:, :1], bounds[:, 1:]

        def betas(low=low, high=high) -> Iterator[torch.Tensor]:
            return (_pcb_balance(chunk, low, high)[0] for chunk in chunks())

        # frozen zeros have |tau| = 0, hence norm 0, inter 0 and balance weight exactly 0
        negatives = None
        if frozen_zeros:
            negatives = [int(n) for n in sum((b < 0).sum(1) for b in betas()).tolist()]
        cut = torch.tensor(
            _union_order_statistics(
                betas,
                [[int(total * (1 - ratio)), total - 1]] * n_tasks,
                count=d,
                zeros=frozen_zeros,
                negatives=negatives,
            ),
            device=stack_of.device,
        )  # (T, 2)
        floor, top = cut[:, :1], cut[:, 1:]
        for key in _progress(group, "pcb") if scope == "global" else group:
            stack = stack_of(key)
            pieces = [_pcb_merge(chunk, low, high, floor, top) for chunk in _column_chunks(stack)]
            delta = torch.cat(pieces).view(stack.shape[1:])
            merged[key] = stack_of.finish(key, stack, delta * lam)
    return merged


# ---------------------------------------------------------------- spectral family


def tsv_m(task_vectors: Sequence[TensorMap], *, lam: float = 1.0) -> StateDict:
    """TSV-Merge: keep each task's top 1/T singular directions, orthogonalise, recombine.

    Paper: Gargiulo et al., 2025, "Task Singular Vectors", arXiv:2412.00081. Scope:
    per-tensor; 2-D keys via SVD (d = floor(r / T) directions per task, d = 0 merges the
    key to zero as in the reference), other keys averaged.
    """
    _check_lam("tsv_m", lam)
    n_tasks = len(task_vectors)

    def merge_matrix(key: str, stack: torch.Tensor) -> torch.Tensor:
        d = min(stack.shape[1:]) // n_tasks
        if d == 0:
            log.warning(
                "tsv_m: %s has rank %d < %d tasks; merged to zero",
                key,
                min(stack.shape[1:]),
                n_tasks,
            )
            return torch.zeros(stack.shape[1:], device=stack.device)
        tops = [_top_svd(task, d) for task in stack]  # per task (m, d) (d,) (d, n)
        u_cat = torch.cat([u for u, _, _ in tops], dim=1)  # (m, T*d)
        s_cat = torch.cat([s for _, s, _ in tops])
        vh_cat = torch.cat([vh for _, _, vh in tops], dim=0)  # (T*d, n)
        return ((_polar(u_cat)[0] * s_cat) @ _polar(vh_cat)[0]).to(stack.dtype)

    return _mean_or_matrix(task_vectors, lam, "tsv_m", merge_matrix)


def iso_c(task_vectors: Sequence[TensorMap], *, lam: float = 1.0) -> StateDict:
    """Iso-C: flatten the spectrum of the summed task matrix to its mean singular value.

    Paper: Marczak et al., 2025, "No Task Left Behind: Isotropic Model Merging with Common
    and Task-Specific Subspaces", arXiv:2502.04959. Scope: per-tensor; 2-D keys use the SVD
    of the *sum*, other keys the mean (as in the reference code).
    """
    _check_lam("iso_c", lam)

    def merge_matrix(key: str, stack: torch.Tensor) -> torch.Tensor:
        polar, s = _polar(stack.sum(0))
        return (s.mean() * polar).to(stack.dtype)

    return _mean_or_matrix(task_vectors, lam, "iso_c", merge_matrix)


def iso_cts(
    task_vectors: Sequence[TensorMap], *, lam: float = 1.0, common_space_fraction: float = 0.8
) -> StateDict:
    """Iso-CTS: common subspace of the sum plus task-specific subspaces, isotropic spectrum.

    Paper: Marczak et al., 2025, arXiv:2502.04959. Scope: per-tensor; 2-D keys via SVD,
    other keys averaged.

    Args:
        common_space_fraction: Share of the rank given to the common subspace, in [0, 1].
    """
    _check_lam("iso_cts", lam)
    _check_range(
        "iso_cts", "common_space_fraction", common_space_fraction, 0.0, 1.0, closed_low=True
    )
    n_tasks = len(task_vectors)

    def merge_matrix(key: str, stack: torch.Tensor) -> torch.Tensor:
        r = min(stack.shape[1:])
        common = int(r * common_space_fraction)
        specific = min(round((r - common) / n_tasks) * n_tasks, (r // n_tasks) * n_tasks)
        common, d = r - specific, specific // n_tasks
        u_c, s_c, vh_c = _top_svd(stack.sum(0), common)
        tops = []
        for task in stack:  # one task at a time in float64: common left subspace removed
            task = task.double()
            tops.append(_top_svd(task - u_c @ (u_c.mT @ task), d))
        u_all = torch.cat([*(u for u, _, _ in tops), u_c], dim=1)  # (m, r)
        vh_all = torch.cat([*(vh for _, _, vh in tops), vh_c], dim=0)  # (r, n)
        sigma = torch.cat([*(s for _, s, _ in tops), s_c]).mean()
        return (sigma * (_polar(u_all)[0] @ _polar(vh_all)[0])).to(stack.dtype)

    return _mean_or_matrix(task_vectors, lam, "iso_cts", merge_matrix)


def _cart_key(key: str, shape: Sequence[int]) -> bool:
    """Attention/MLP weight matrices (open_clip names); everything else stays at the mean."""
    return (
        len(shape) == 2
        and ("attn" in key or "mlp" in key)
        and "ln" not in key
        and "bias" not in key
    )


def cart(
    task_vectors: Sequence[TensorMap], *, lam: float = 2.0, rank_ratio: float = 0.12
) -> StateDict:
    """CART: weight average plus lam times low-rank approximations of centred task vectors.

    Paper: Choi et al., 2024, "Revisiting Weight Averaging for Model Merging",
    arXiv:2412.12153. Scope: per-tensor; rank-k SVD (k = max(1, floor(rank_ratio * r))) on
    attention/MLP weight matrices only. Affine in lam: lam = 0 or rank_ratio = 1 give plain
    weight averaging. Defaults: the 8-task ViT-B/32 config (rho 0.12, lam 2.0).

    Args:
        rank_ratio: Kept fraction of each matrix's rank, in (0, 1].
    """
    _check_lam("cart", lam)
    _check_range("cart", "rank_ratio", rank_ratio, 0.0, 1.0, closed_low=False)
    merged = {}
    keys, stack_of = _prepare(task_vectors, "cart")
    for key in _progress(keys, "cart"):
        stack = stack_of(key)
        mean = stack.mean(0)
        if lam == 0 or not _cart_key(key, stack.shape[1:]):
            merged[key] = stack_of.finish(key, stack, mean)
            continue
        rank = max(1, math.floor(rank_ratio * min(stack.shape[1:])))
        low_rank = torch.zeros(mean.shape, dtype=torch.float64, device=mean.device)
        for task in stack:  # one centred task at a time: no (T, m, n) temporaries
            u, s, vh = _top_svd(task - mean, rank)
            low_rank += (u * s) @ vh
        merged[key] = stack_of.finish(key, stack, mean + lam * low_rank.to(mean.dtype))
    return merged


# ---------------------------------------------------------------- registry

METHODS: dict[str, Method] = {
    f.__name__: f
    for f in (
        weight_averaging,
        task_arithmetic,
        ties,
        dare,
        breadcrumbs,
        magmax,
        random_mix,
        pcb,
        tsv_m,
        iso_c,
        iso_cts,
        cart,
        consensus,
    )
}

# How the merged delta depends on lam (docs/methods.md): Weight Weaving's fast path.
LAMBDA_AFFINE = frozenset({"cart"})
LAMBDA_LINEAR = frozenset(set(METHODS) - LAMBDA_AFFINE)


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_hyperparameters(name: str, hyperparameters: Mapping[str, object] | None) -> None:
    """Raise ValueError unless ``name`` is a method that accepts these keyword arguments and
    values, so a bad value fails before any tensor is read, not minutes into a merge.

    The values are checked by the method itself, run on a one-task, two-key problem of zeros:
    the same range and type checks as a real merge, and no second copy of them to drift.
    """
    method = get(name)
    hyperparameters = dict(hyperparameters or {})
    try:
        inspect.signature(method).bind([], **hyperparameters)
    except TypeError as err:
        raise ValueError(f"{name}: {err}") from None
    probe = [{"probe.weight": torch.zeros(2, 2), "probe.bias": torch.zeros(2)}]
    try:
        method(probe, **hyperparameters)
    except ValueError:
        raise
    except (TypeError, AttributeError, RuntimeError) as err:
        raise ValueError(f"{name}: invalid hyperparameters {hyperparameters}: {err}") from None


# A lambda is a scaling factor of task vectors: 0 leaves the pretrained model, 1 adds them
# whole. Beyond LAM_MAX float32 weights degrade or overflow; more than MAX_LAMBDAS values is
# a typo (a step of 1e-9), not a search space.
LAM_MAX = 100.0
MAX_LAMBDAS = 1000


def check_lambdas(values: object, what: str = "lambdas") -> list[float]:
    """A lambda sweep or search space as floats, or ValueError naming the first bad value."""
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{what} = {values!r}: expected a non-empty list of numbers")
    if len(values) > MAX_LAMBDAS:
        raise ValueError(f"{what} has {len(values)} values; expected at most {MAX_LAMBDAS}")
    for value in values:
        check_lam(value, what)
    return [float(v) for v in values]


def check_lam(value: object, what: str = "lam") -> float:
    """One lambda: a finite number in [0, LAM_MAX]."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and 0 <= value <= LAM_MAX):
        raise ValueError(f"{what}: {value!r} is invalid; expected a number in [0, {LAM_MAX:g}]")
    return float(value)
