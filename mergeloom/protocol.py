"""Evaluation protocols: what is merged, and where the merge is evaluated.

See docs/methods.md#multitask, #continual and #domains.

A *problem* is one merge: which task vectors go in, and the evaluation sets (head + val/test
images) on which the merged image encoder is scored. The three setups differ only in their
problems:
  * multi-task: merge all tasks, score each task with its own head;
  * continual: merge all class splits, score the full test set with one 10-way head (the
    primary, task-agnostic metric) and, as diagnostics, each split's images with that head;
  * domain generalisation: per held-out domain, merge the other domains, score the held-out one.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset

from mergeloom.tasks import Task, labels_of


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Where a merged encoder is scored: a head and the val/test datasets it classifies."""

    name: str
    head: torch.Tensor  # (embed_dim, C)
    val: Dataset
    test: Dataset


@dataclass(frozen=True)
class Problem:
    name: str
    members: tuple[str, ...]  # task vectors merged, by task name
    eval_sets: tuple[EvalSet, ...]
    primary: tuple[str, ...]  # eval sets averaged for the headline number and the oracle


def _subset(split: Dataset, classes: Sequence[int]) -> Subset:
    """The items of ``split`` whose label is in ``classes``, labels unchanged (an index view:
    evaluation reuses the full split's features for it)."""
    keep = torch.isin(labels_of(split), torch.tensor(list(classes), dtype=torch.int64))
    return Subset(split, keep.nonzero().flatten().tolist())


def multitask_problems(tasks: Sequence[Task], heads: Mapping[str, torch.Tensor]) -> list[Problem]:
    sets = tuple(EvalSet(t.name, heads[t.name], t.val, t.test) for t in tasks)
    names = tuple(t.name for t in tasks)
    return [Problem("all", names, sets, primary=names)]


def continual_problems(
    splits: Mapping[str, Sequence[int]], all_classes: Task, head: torch.Tensor
) -> list[Problem]:
    """One merge of every split; ``all`` (10-way, full test) is primary, splits diagnostic."""
    full = EvalSet("all", head, all_classes.val, all_classes.test)
    per_split = tuple(
        EvalSet(name, head, _subset(all_classes.val, c), _subset(all_classes.test, c))
        for name, c in splits.items()
    )
    return [Problem("all", tuple(splits), (full, *per_split), primary=("all",))]


def domain_problems(tasks: Sequence[Task], heads: Mapping[str, torch.Tensor]) -> list[Problem]:
    if len(tasks) < 2:
        raise ValueError(f"leave-one-domain-out needs at least 2 domains, got {len(tasks)}")
    problems = []
    for held_out in tasks:
        others = tuple(t.name for t in tasks if t.name != held_out.name)
        sets = (EvalSet(held_out.name, heads[held_out.name], held_out.val, held_out.test),)
        problems.append(Problem(held_out.name, others, sets, primary=(held_out.name,)))
    return problems


def eval_sets_of(problems: Sequence[Problem]) -> list[EvalSet]:
    """Every distinct evaluation set of a setup, in first-seen order."""
    seen: dict[str, EvalSet] = {}
    for problem in problems:
        for s in problem.eval_sets:
            seen.setdefault(s.name, s)
    return list(seen.values())


def oracle(curves: Mapping[str, Mapping[str, float]], primary: Sequence[str]) -> str:
    """lam with the best mean *validation* accuracy over the primary sets (ties: smaller lam)."""
    ordered = sorted(curves, key=float)
    return max(ordered, key=lambda lam: statistics.fmean(curves[lam][s] for s in primary))


def best_lambdas(curves: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per evaluation set, its own best lam on validation: the dispersion WW exploits.

    ``curves`` maps lam (as a string key, JSON-ready) to {set: validation accuracy}.
    """
    ordered = sorted(curves, key=float)
    names = curves[ordered[0]].keys()
    return {n: float(max(ordered, key=lambda lam, n=n: curves[lam][n])) for n in names}


def dispersion(lambdas: Sequence[float]) -> dict[str, float]:
    """Spread of per-set optimal lambdas: min, max, quartiles and IQR."""
    values = sorted(lambdas)
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"min": values[0], "max": values[-1], "q1": q1, "q3": q3, "iqr": q3 - q1,
            "median": statistics.median(values)}  # fmt: skip


def normalized(accuracy: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Merged over expert accuracy per set, where the expert's accuracy is positive."""
    return {k: accuracy[k] / reference[k] for k in accuracy if reference.get(k, 0) > 0}
