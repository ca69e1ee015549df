"""Task-vector correlation and redundancy measures, streamed one key at a time.

Definitions: docs/methods.md#analysis.

Inputs are task vectors as mappings key -> tensor (lazy on disk or in memory) with equal keys and
shapes; nothing holds more than one key of every task at once, so eight ViT-L-sized vectors fit
in a few GB. Each key is computed on ``compute_device()`` (mergeloom.device) and sums are
accumulated there in float64; results come back to the CPU. Every measure is a pure function;
``describe`` gathers them into one JSON-ready summary of a set of task vectors, reading the task
vectors once for all of them (after the two passes that find the top-k thresholds).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from mergeloom.device import compute_device
from mergeloom.progress import progress
from mergeloom.stats import order_statistics
from mergeloom.vectors import TaskVector, TensorMap, check_compatible, shape_of

SPECTRUM_GRID = tuple(i / 20 for i in range(1, 21))  # rank fractions of the energy curves
PAIRWISE_NOTE = "pairwise measures (cosine, sign conflicts, overlap, interference) need 2+ tasks"
_HEAD = 10_000  # depth() of keys after the last block
_CHUNK_BYTES = 1 << 22  # of one float32 (T, columns) chunk of an element-wise measure
_BLOCK = re.compile(r"(?:resblocks|blocks|layers?|layer)\.(\d+)\.")


# ---------------------------------------------------------------- parameter layout


def parameter_group(key: str) -> str:
    """Which part of a transformer a key belongs to (open_clip and timm/HF naming)."""
    name = key.lower()
    if re.search(r"(^|\.)(ln_|norm|layernorm)|\.ln\d|_ln\b", name):
        return "norms"
    if "attn" in name or "attention" in name:
        return "attention"
    if "mlp" in name or ".fc" in name:
        return "mlp"
    if re.search(r"embed|conv1|patch|cls_token|class_embedding", name):
        return "embeddings"
    return "other"


def depth(key: str) -> int:
    """Residual block index of a key; -1 before the blocks (stem), a large value after (head)."""
    found = _BLOCK.search(key)
    if found:
        return int(found.group(1))
    return -1 if parameter_group(key) == "embeddings" or "_pre" in key else _HEAD


def _is_matrix(key: str, shape: Sequence[int]) -> bool:
    """The 2-D weights TSV/Iso/CART treat as matrices (text_projection excluded, as they do)."""
    return len(shape) == 2 and min(shape) > 1 and "text_projection" not in key


# ---------------------------------------------------------------- inputs


def _check(task_vectors: Sequence[TensorMap]) -> list[str]:
    if len(task_vectors) == 0:
        raise ValueError("analysis needs at least one task vector, got none")
    names = [str(getattr(tv, "path", getattr(tv, "name", f"task vector {i}")))
             for i, tv in enumerate(task_vectors)]  # fmt: skip
    check_compatible(task_vectors, names=names)
    return list(task_vectors[0])


def _stack(
    task_vectors: Sequence[TensorMap], key: str, device: torch.device | None = None
) -> torch.Tensor:
    """(T, *shape) float32 stack of one key on ``device`` (default: the compute device)."""
    stack = torch.stack([tv[key].float() for tv in task_vectors])
    return stack.to(compute_device() if device is None else device)


def _column_chunks(stack: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(T, columns) views of a stack flattened per task, a few MB each, for the element-wise
    measures. Their temporaries then stay below glibc's mmap threshold (32 MB at most) and reuse
    heap pages, where temporaries of a whole ViT key are fresh mappings whose page faults cost
    more than the arithmetic on them (~0.5 s/GB here)."""
    flat = stack.reshape(len(stack), -1)
    return flat.split(max(1, _CHUNK_BYTES // (4 * len(stack))), dim=1)


class _Measure(Protocol):
    def add(self, key: str, stack: torch.Tensor) -> None: ...


def _stream(
    task_vectors: Sequence[TensorMap], keys: Sequence[str], measures: Sequence[_Measure], desc: str
) -> None:
    """One pass over the task vectors: each key's stack is read once and given to every
    measure (reading dominates simple measures: a ViT-B/32 pass over 8 experts reads 3 GB)."""
    for key in progress(keys, desc=desc, unit="tensor", leave=False):
        stack = _stack(task_vectors, key)
        for measure in measures:
            measure.add(key, stack)


def increments(task_vectors: Sequence[TensorMap]) -> list[TensorMap]:
    """Per-step updates of a sequential chain: delta_t = tau_t - tau_{t-1}, delta_1 = tau_1.

    Cumulative task vectors of a chain share every earlier step, so their correlation partly
    counts the same update twice; the increments isolate what each task added.
    """
    steps = [TaskVector(task_vectors[i], task_vectors[i - 1], name=f"increment {i + 1}")
             for i in range(1, len(task_vectors))]  # fmt: skip
    return [*task_vectors[:1], *steps]


# ---------------------------------------------------------------- correlation


class _Grams:
    """key -> (T, T) float64 inner products <tau_i[key], tau_j[key]>, on the CPU."""

    def __init__(self) -> None:
        self.grams: dict[str, torch.Tensor] = {}

    def add(self, key: str, stack: torch.Tensor) -> None:
        t = len(stack)
        gram = torch.zeros(t, t, dtype=torch.float64, device=stack.device)
        for chunk in _column_chunks(stack):
            chunk = chunk.double()
            gram += chunk @ chunk.T
        self.grams[key] = gram.cpu()


def gram_per_key(task_vectors: Sequence[TensorMap]) -> dict[str, torch.Tensor]:
    """key -> (T, T) float64 inner products <tau_i[key], tau_j[key]>; all cosines derive from it."""
    grams = _Grams()
    _stream(task_vectors, _check(task_vectors), [grams], "inner products")
    return grams.grams


def total_gram(
    grams: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None
) -> torch.Tensor:
    chosen = list(grams) if keys is None else list(keys)
    return torch.stack([grams[k] for k in chosen]).sum(0)


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """(T, T) cosine similarities; a zero vector has cosine 0 with everything (and itself)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cosine = gram / safe[:, None] / safe[None, :]
    return cosine * (norms[:, None] > 0) * (norms[None, :] > 0)


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of the entries i != j; NaN for a 1x1 matrix (no pairs)."""
    n = matrix.shape[0]
    if n < 2:
        return math.nan
    off = ~torch.eye(n, dtype=torch.bool)
    return float(matrix[off].double().mean())


def cosine_by(grams: Mapping[str, torch.Tensor], label: Callable[[str], object]) -> dict:
    """label -> (T, T) cosine over the keys with that label (per layer, per group, ...)."""
    labels: dict[object, list[str]] = {}
    for key in grams:
        labels.setdefault(label(key), []).append(key)
    return {name: cosine_from_gram(total_gram(grams, ks)) for name, ks in labels.items()}


def alignment_ratio(gram: torch.Tensor) -> float:
    """||sum tau_t|| / sum ||tau_t||: 1 for parallel vectors, 1/sqrt(T) for orthogonal equal ones.

    A zero vector set gives NaN.
    """
    norms = gram.diagonal().clamp(min=0).sqrt()
    total = float(norms.sum())
    return math.sqrt(max(float(gram.sum()), 0.0)) / total if total > 0 else math.nan


def stack_effective_rank(gram: torch.Tensor) -> float:
    """Effective rank of the (T, n) stack of task vectors: how many independent directions."""
    eigenvalues = torch.linalg.eigvalsh(gram).clamp(min=0)
    return effective_rank(eigenvalues.sqrt())


# ---------------------------------------------------------------- spectra


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's exp(entropy of s_i / sum s); 0 for a zero matrix, 1 for rank one."""
    s = singular_values.double().clamp(min=0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy(singular_values: torch.Tensor, fraction: float) -> float:
    """Share of sum s_i^2 in the top max(1, ceil(fraction * r)) singular directions."""
    s2 = singular_values.double().square()
    total = float(s2.sum())
    if total <= 0:
        return math.nan
    k = max(1, math.ceil(fraction * len(s2) - 1e-9))
    return float(s2[:k].sum()) / total


def spectrum_summary(singular_values: torch.Tensor, energy_top: Sequence[float]) -> dict:
    """Rank measures of one matrix from its singular values (descending)."""
    s = singular_values.double()
    r, s2 = len(s), s.square()
    total = float(s2.sum())
    if total <= 0:
        return {}
    cumulative = s2.cumsum(0) / total
    k90 = int(torch.searchsorted(cumulative, torch.tensor(0.9 - 1e-12, dtype=s.dtype))) + 1
    summary = {
        "effective_rank_ratio": effective_rank(s) / r,
        "stable_rank_ratio": total / float(s2[0]) / r,
        "k90_ratio": min(k90, r) / r,
    }
    summary |= {f"energy_top{_percent(f)}": energy(s, f) for f in energy_top}
    return summary


def _energy_curve(singular_values: torch.Tensor) -> list[float]:
    return [energy(singular_values, g) for g in SPECTRUM_GRID]


def singular_task_interference(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, d: int | None = None
) -> tuple[float, float]:
    """TSV's interference ||(U^T U - I) S (V^T V - I)||_1 (entry-wise), and ||S||_1.

    Takes the batched thin SVD (T, m, r), (T, r), (T, r, n) of the T tasks' matrices, or only
    its first ``d`` singular triplets with ``d`` given (the default is max(1, r // T)).
    U = [U_1 | ... | U_T] concatenates each task's top d left singular vectors by columns
    (TSV-M's allocation; docs/methods.md#sti documents why not FusionBench's row
    concatenation), V likewise, S = blockdiag(S_1, ..., S_T). Orthogonal task subspaces give 0.
    """
    t, m, r = u.shape
    n = vh.shape[2]
    d = max(1, r // t) if d is None else d
    u = u[:, :, :d].double().permute(1, 0, 2).reshape(m, t * d)
    v = vh[:, :d, :].double().transpose(1, 2).permute(1, 0, 2).reshape(n, t * d)
    sigma = s[:, :d].double().reshape(-1)
    eye = torch.eye(t * d, dtype=torch.float64, device=u.device)
    interference = ((u.T @ u - eye) * sigma[None, :]) @ (v.T @ v - eye)
    return float(interference.abs().sum()), float(sigma.abs().sum())


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values (..., r), descending, of float64 matrices (..., m, n) with n <= m.

    They are the square roots of the eigenvalues of the (n, n) Gram matrix: an
    eigendecomposition of the smaller side costs a fraction of an SVD, and in float64 it gives
    every singular value above ~1e-7 of the largest at least as accurately as a float32 SVD
    of the (float32) task vectors does.
    """
    return torch.linalg.eigvalsh(x.mT @ x).flip(-1).clamp(min=0).sqrt()


def top_singular_triplets(
    x: torch.Tensor, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All singular values (T, r) of float64 matrices (T, m, n) with n <= m, and the top ``d``
    left and right singular vectors (T, m, d), (T, d, n), from the Gram matrix as
    ``singular_values``. Directions whose singular value is below the float32 rank tolerance
    (r_max * eps * s_max, numpy's matrix_rank) are set to zero vectors: their directions are
    arbitrary (an SVD's completion), so they carry no interference.
    """
    values, vectors = torch.linalg.eigh(x.mT @ x)
    s = values.flip(-1).clamp(min=0).sqrt()
    v = vectors[..., -d:].flip(-1)  # (T, n, d), descending
    top = s[:, :d]
    tolerance = s[:, :1] * max(x.shape[-2:]) * torch.finfo(torch.float32).eps
    kept = top > tolerance
    u = x @ v / torch.where(kept, top, torch.ones_like(top))[:, None, :]
    return s, u * kept[:, None, :], (v * kept[:, None, :]).mT


def _key_spectra(stack: torch.Tensor) -> tuple[dict[str, torch.Tensor | None], tuple | None]:
    """kind -> singular values (rows, r) on the CPU, and (interference, mass) for 2+ tasks."""
    x = stack.double()
    if x.shape[1] < x.shape[2]:
        x = x.mT  # the Gram matrix of the smaller side; interference is symmetric in U and V
    t, r = len(x), x.shape[2]
    if t < 2:
        return {"uncentered": singular_values(x).cpu(), "centered": None,
                "sum": singular_values(x.sum(0)).cpu()[None]}, None  # fmt: skip
    singular, u, vh = top_singular_triplets(x, max(1, r // t))
    values = {
        "uncentered": singular.cpu(),
        "centered": singular_values(x - x.mean(0)).cpu(),
        "sum": singular_values(x.sum(0)).cpu()[None],
    }
    return values, singular_task_interference(u, singular, vh, d=u.shape[2])


class _Spectra:
    """Rank measures of every weight matrix, per task uncentred and centred, and of the sum."""

    def __init__(self, energy_top: Sequence[float]) -> None:
        self.energy_top = energy_top
        self.found: dict[str, list[dict]] = {"uncentered": [], "centered": [], "sum": []}
        self.curves: dict[str, list[list[float]]] = {kind: [] for kind in self.found}
        self.matrices, self.sti, self.sigma_mass = 0, 0.0, 0.0

    def add(self, key: str, stack: torch.Tensor) -> None:
        if not _is_matrix(key, stack.shape[1:]):
            return
        self.matrices += 1
        values, interference = _key_spectra(stack)
        for kind, rows in values.items():
            for s in rows if rows is not None else []:
                if (summary := spectrum_summary(s, self.energy_top)) != {}:
                    self.found[kind].append(summary)
                    self.curves[kind].append(_energy_curve(s))
        if interference is not None:
            self.sti += interference[0]
            self.sigma_mass += interference[1]

    def result(self, tasks: int) -> dict:
        out = {kind: _mean_dicts(rows) for kind, rows in self.found.items() if rows}
        out["curves"] = {kind: _mean_lists(c) for kind, c in self.curves.items() if c}
        out["matrices"] = self.matrices
        if tasks > 1 and self.sigma_mass > 0:
            relative = self.sti / self.sigma_mass
            out["singular_task_interference"] = {"total": self.sti, "relative": relative}
        return out


def spectra(task_vectors: Sequence[TensorMap], energy_top: Sequence[float]) -> dict:
    """Spectral structure of every weight matrix: per task uncentred and CART-centred, and the sum.

    Returns the mean of each rank measure over (matrix, task), mean energy curves on
    ``SPECTRUM_GRID``, and the summed singular task interference. Centred vectors of a single
    task are zero, so the centred entries need two tasks.
    """
    keys = _check(task_vectors)
    matrices = [k for k in keys if _is_matrix(k, shape_of(task_vectors[0], k))]
    measure = _Spectra(energy_top)
    _stream(task_vectors, matrices, [measure], "spectra")
    return measure.result(len(task_vectors))


def _mean_dicts(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _mean_lists(rows: Sequence[Sequence[float]]) -> list[float]:
    return [sum(column) / len(column) for column in zip(*rows, strict=True)]


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


# ---------------------------------------------------------------- redundancy


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    bad = [f for f in fractions if not (isinstance(f, int | float) and 0 < f <= 1)]
    if bad or not fractions:
        raise ValueError(f"top-k fractions must lie in (0, 1], got {list(fractions)}")
    return sorted(set(map(float, fractions)))


def magnitude_thresholds(
    task_vectors: Sequence[TensorMap], fractions: Sequence[float]
) -> torch.Tensor:
    """(T, K) global top-k magnitude thresholds per task: keep entries strictly above them.

    The threshold is the (d - floor(d k))-th smallest |tau| (TIES's order statistic), and the
    strict comparison keeps exactly floor(d k) entries when magnitudes are distinct (TIES keeps
    one more); k = 1 gives 0, which keeps every non-zero entry. The selection runs on the CPU
    (mergeloom.stats).
    """
    keys, fractions = _check(task_vectors), _check_fractions(fractions)
    t, d = len(task_vectors), sum(math.prod(shape_of(task_vectors[0], k)) for k in keys)
    ranks = [d - int(d * f) - 1 for f in fractions]  # 0-based; -1 keeps everything
    wanted = sorted({r for r in ranks if r >= 0})
    values = [[] for _ in range(t)]
    if wanted:
        cpu = torch.device("cpu")
        chunks = lambda: (_stack(task_vectors, k, cpu).reshape(t, -1).abs() for k in keys)  # noqa: E731
        values = order_statistics(chunks, [wanted] * t, count=d)
    at = [dict(zip(wanted, row, strict=True)) for row in values]
    return torch.tensor([[at[i].get(r, 0.0) for r in ranks] for i in range(t)], dtype=torch.float64)


class _Counts:
    """Running counts of one top-k level over the keys (float64: exact to 2**53)."""

    def __init__(self, t: int, device: torch.device):
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.both = zeros(t, t)  # |M_i & M_j|
        self.agree = zeros(t, t)  # same sign minus opposite sign
        self.kept_mass = zeros(t)
        self.multi = zeros(t)  # coords kept by 2+ of the first t tasks
        self.conflicted = zeros(t)  # ... with both signs among them
        self.usage = zeros(t + 1)  # coords kept by exactly c tasks

    def add(self, signs: torch.Tensor, magnitude: torch.Tensor, threshold: torch.Tensor) -> None:
        """One chunk: ``signs`` and ``magnitude`` (T, n) of its entries, float32."""
        kept = (magnitude > threshold[:, None]).float()  # (T, n); kept entries are non-zero
        kept_signs = signs * kept
        self.both += (kept @ kept.T).double()  # per-chunk counts < 2**24, exact in float32
        self.agree += (kept_signs @ kept_signs.T).double()
        self.kept_mass += (magnitude * kept).sum(1).double()
        # Per coordinate, over the first t tasks: kept count k and (positives - negatives) s,
        # by one matmul each with a lower-triangular matrix of ones (small integers: exact).
        # Kept by 2+ tasks: k >= 2; with both signs: |s| < k.
        first = torch.ones(len(kept), len(kept), device=kept.device).tril()
        counts, balance = first @ kept, first @ kept_signs
        self.multi += (counts >= 2).sum(1)
        self.conflicted += (balance.abs() < counts).sum(1)
        self.usage += torch.bincount(counts[-1].long(), minlength=len(self.usage))

    def cpu(self) -> _Counts:
        """These counts, moved to the CPU for the summary."""
        for name, value in vars(self).items():
            setattr(self, name, value.cpu())
        return self


def _pairwise_rates(counts: _Counts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, T) sign-conflict rate given both kept, Jaccard and overlap coefficient."""
    both, sizes = counts.both, counts.both.diagonal()
    safe = lambda x: torch.where(x > 0, x, torch.ones_like(x))  # noqa: E731
    conflict = (both - counts.agree) / 2 / safe(both) * (both > 0)
    union = sizes[:, None] + sizes[None, :] - both
    return conflict, both / safe(union) * (union > 0), both / safe(sizes)[:, None]


class _Redundancy:
    """Per top-k level counts, |tau| mass and MagMax winners, one key at a time."""

    def __init__(self, t: int, levels: list[float], thresholds: torch.Tensor):
        device = compute_device()
        self.levels, self.thresholds = levels, thresholds.float().to(device)  # (T, K), exact
        self.counts = [_Counts(t, device) for _ in levels]
        self.mass = torch.zeros(t, dtype=torch.float64, device=device)
        self.winners = torch.zeros(t, dtype=torch.float64, device=device)
        self.coordinates = 0

    def add(self, key: str, stack: torch.Tensor) -> None:
        for chunk in _column_chunks(stack):
            magnitude, signs = chunk.abs(), chunk.sign()
            self.mass += magnitude.sum(1).double()
            self.winners += torch.bincount(_magmax_owner(magnitude), minlength=len(chunk))
            self.coordinates += chunk.shape[1]
            for level, counts in enumerate(self.counts):
                counts.add(signs, magnitude, self.thresholds[:, level])

    def result(self) -> dict:
        counts = [c.cpu() for c in self.counts]
        return _redundancy_summary(self.levels, counts, self.mass.cpu(), self.winners.cpu(),
                                   self.coordinates)  # fmt: skip


def _magmax_owner(magnitude: torch.Tensor) -> torch.Tensor:
    """The task MagMax takes each coordinate with a non-zero entry from: the largest |tau|, ties
    to the later task. A running maximum over the tasks (argmax over dim 0 is strided)."""
    largest = magnitude[0].clone()
    owner = torch.zeros(magnitude.shape[1], dtype=torch.int64, device=magnitude.device)
    for i in range(1, len(magnitude)):
        owner.masked_fill_(magnitude[i] >= largest, i)
        torch.maximum(largest, magnitude[i], out=largest)
    return owner[largest > 0]


def redundancy(task_vectors: Sequence[TensorMap], fractions: Sequence[float]) -> dict:
    """Sign conflicts, top-k mask overlap, mass share, parameter usage and MagMax provenance.

    A task's top-k mask keeps its floor(d k) entries of largest |tau| (``magnitude_thresholds``).
    Sign conflicts are also reported untrimmed ("all": every non-zero entry).
    Returns per level the summary scalars, and (T, T) matrices under "matrices".
    """
    keys, levels = _check(task_vectors), _check_fractions([*fractions, 1.0])
    measure = _Redundancy(len(task_vectors), levels, magnitude_thresholds(task_vectors, levels))
    _stream(task_vectors, keys, [measure], "redundancy")
    return measure.result()


def _redundancy_summary(levels: list[float], counts: list[_Counts], mass: torch.Tensor,
                        winners: torch.Tensor, coordinates: int) -> dict:  # fmt: skip
    t = len(mass)
    out: dict = {"magmax_winner_share": (winners / max(float(winners.sum()), 1.0)).tolist()}
    matrices = {}
    for fraction, c in zip(levels, counts, strict=True):
        conflict, jaccard, overlap = _pairwise_rates(c)
        entry = {
            "sign_conflict": float(c.conflicted[-1] / c.multi[-1]) if c.multi[-1] else math.nan,
            "sign_conflict_of_all": float(c.conflicted[-1]) / coordinates,
            "sign_conflict_by_tasks": [
                float(c.conflicted[i] / c.multi[i]) if c.multi[i] else math.nan for i in range(1, t)
            ],  # fmt: skip
            "sign_conflict_pairwise": mean_off_diagonal(conflict),
            "unused": float(c.usage[0]) / coordinates,
            "selfish": float(c.usage[1]) / coordinates,
        }
        name = "all" if fraction == 1.0 else f"top{_percent(fraction)}"
        matrices[f"sign_conflict@{name}"] = conflict
        if fraction < 1.0:
            entry |= {
                "jaccard": mean_off_diagonal(jaccard),
                "jaccard_if_independent": fraction / (2 - fraction),
                "overlap": mean_off_diagonal(overlap),
                "overlap_if_independent": fraction,
                "mass_share": float((c.kept_mass / mass.clamp(min=1e-300)).mean()),
            }
            matrices[f"jaccard@{name}"] = jaccard
        out[name] = entry
    out["matrices"] = matrices
    return out


# ---------------------------------------------------------------- everything at once


def layer_name(level: int) -> str:
    return {-1: "stem", _HEAD: "head"}.get(level, f"block{level}")


def layer_profile(grams: Mapping[str, torch.Tensor]) -> list[dict]:
    """Mean off-diagonal cosine per residual block: whole block, attention only, MLP only.

    Depth -1 is the stem (embeddings, ln_pre); the head (ln_post, proj) comes after the last block.
    """
    blocks = [d for d in map(depth, grams) if 0 <= d < _HEAD]
    head = max(blocks, default=-1) + 1
    rows = []
    for group in ("all", "attention", "mlp"):
        chosen = {k: g for k, g in grams.items() if group in ("all", parameter_group(k))}
        for level, matrix in sorted(cosine_by(chosen, depth).items()):
            rows.append({"group": group, "depth": head if level == _HEAD else level,
                         "layer": layer_name(level),
                         "mean_cosine": mean_off_diagonal(matrix)})  # fmt: skip
    return rows


def correlation(task_vectors: Sequence[TensorMap]) -> dict:
    """Norms, cosine matrix (whole, per group, per layer), alignment and stack effective rank."""
    return _correlation_summary(gram_per_key(task_vectors), len(task_vectors))


def _correlation_summary(grams: Mapping[str, torch.Tensor], t: int) -> dict:
    gram = total_gram(grams)
    cosine = cosine_from_gram(gram)
    by_group = cosine_by(grams, parameter_group)
    return {
        "norms": gram.diagonal().sqrt().tolist(),
        "cosine_mean_off_diagonal": mean_off_diagonal(cosine),
        "cosine_by_group": {g: mean_off_diagonal(m) for g, m in sorted(by_group.items())},
        "alignment_ratio": alignment_ratio(gram),
        "alignment_ratio_if_orthogonal": 1 / math.sqrt(t),
        "stack_effective_rank": stack_effective_rank(gram),
        "matrices": {"cosine": cosine},
        "layers": layer_profile(grams),
    }


def describe(task_vectors: Sequence[TensorMap], *, topk: Sequence[float] = (0.05, 0.1, 0.2),
             energy_top: Sequence[float] = (0.01, 0.05, 0.1)) -> dict:  # fmt: skip
    """Every measure of docs/methods.md#analysis for one set of task vectors.

    With a single task only norms and spectra are defined; the pairwise entries are left out and
    ``note`` says so.
    """
    keys, t = _check(task_vectors), len(task_vectors)
    levels = [*_check_fractions(topk), 1.0]
    _check_fractions(energy_top)
    grams, spectral = _Grams(), _Spectra(energy_top)
    measures: list[_Measure] = [grams, spectral]
    if t > 1:
        measures.append(_Redundancy(t, levels, magnitude_thresholds(task_vectors, levels)))
    _stream(task_vectors, keys, measures, "analysis")
    out = {"tasks": t, "correlation": _correlation_summary(grams.grams, t),
           "spectra": spectral.result(t)}  # fmt: skip
    if t < 2:
        out["correlation"] = {"norms": out["correlation"]["norms"]}
        out["note"] = PAIRWISE_NOTE
        return out
    out["redundancy"] = measures[-1].result()
    return out
