"""The one task type of mergeloom: class names, prompt templates and three map-style splits.

Every split is a ``torch.utils.data.Dataset`` of ``(image, int label)``: PIL images for the
benchmark datasets read from disk (``mergeloom.datasets``), ``(3, S, S)`` tensors in [0, 1] for
the in-memory digits (``mergeloom.data``, as ``TensorImages``). Fine-tuning and evaluation
(``mergeloom.train``, ``mergeloom.evaluate``) take either, so one loop serves both; tensor
splits additionally round-trip through one safetensors file (``save_task`` / ``load_task``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from mergeloom import vectors

SPLITS = ("train", "val", "test")


@dataclass(frozen=True, eq=False)
class Task:
    """A classification task: the data plus what a zero-shot head needs to name its classes
    (eq=False: datasets have no meaningful equality)."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]  # format strings with one "{}" for the class name
    train: Dataset  # (image, label) pairs; labels in 0..len(classnames)-1
    val: Dataset
    test: Dataset


class TensorImages(Dataset):
    """Images already in memory as one tensor: items are ``(image (3, S, S), int label)``.

    Kept as whole tensors (``.images``, ``.labels``) so that evaluation can slice batches
    directly and a task can be saved as one safetensors file.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise ValueError(
                f"TensorImages needs tensors, got images {type(images).__name__} and labels "
                f"{type(labels).__name__}"
            )
        if (
            images.ndim != 4
            or images.shape[1] != 3
            or images.shape[2] != images.shape[3]
            or images.dtype != torch.float32
        ):
            raise ValueError(
                f"TensorImages images must be float32 of shape (N, 3, S, S), got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        if labels.ndim != 1 or labels.dtype != torch.int64 or len(labels) != len(images):
            raise ValueError(
                f"TensorImages labels must be int64 of shape ({len(images)},) to match the "
                f"images, got {labels.dtype} {tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class Relabeled(Dataset):
    """The images at ``indices`` of ``dataset`` with labels mapped through ``mapping``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], mapping: torch.Tensor) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.labels = mapping[labels_of(dataset)[torch.as_tensor(self.indices, dtype=torch.int64)]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]][0], int(self.labels[i])


def labels_of(dataset: Dataset) -> torch.Tensor:
    """Labels (N,) int64 of a dataset, read without decoding any image where the dataset
    keeps them (TensorImages, Subset, Relabeled, torchvision's targets/labels/_samples)."""
    if isinstance(dataset, (TensorImages, Relabeled)):
        return dataset.labels
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    for attr in ("targets", "labels", "_labels"):
        if hasattr(dataset, attr):
            return torch.as_tensor(np.asarray(getattr(dataset, attr)), dtype=torch.int64)
    if hasattr(dataset, "_samples"):  # GTSRB, StanfordCars, FER2013, RenderedSST2
        return torch.tensor([int(s[1]) for s in dataset._samples], dtype=torch.int64)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


def class_subset(task: Task, classes: Sequence[int], name: str) -> Task:
    """The task restricted to ``classes``, labels remapped to 0..|classes|-1 in sorted order,
    with those classes' names: the subset head's task of a class-incremental split."""
    classes = sorted(classes)
    n = len(task.classnames)
    if not classes or classes[0] < 0 or classes[-1] >= n or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct indices in 0..{n - 1}, got {classes}")
    mapping = torch.full((n,), -1, dtype=torch.int64)
    mapping[torch.tensor(classes)] = torch.arange(len(classes))

    def keep(ds: Dataset) -> Relabeled:
        idx = torch.isin(labels_of(ds), torch.tensor(classes)).nonzero().flatten().tolist()
        return Relabeled(ds, idx, mapping)

    return Task(
        name,
        tuple(task.classnames[c] for c in classes),
        task.templates,
        keep(task.train),
        keep(task.val),
        keep(task.test),
    )


def leave_one_out(names: Sequence[str]) -> dict[str, list[str]]:
    """held-out domain -> the source domains whose experts are merged for it."""
    if len(names) < 2:
        raise ValueError(f"leave-one-domain-out needs at least 2 domains, got {list(names)}")
    return {held: [d for d in names if d != held] for held in names}


def save_task(task: Task, path: str | os.PathLike) -> None:
    """Write a task whose splits are TensorImages as one safetensors file: ``{split}_images``,
    ``{split}_labels`` and the name, class names and templates as metadata.

    Raises:
        ValueError: A split is not a TensorImages (disk datasets stay on disk).
    """
    tensors = {}
    for split in SPLITS:
        part = getattr(task, split)
        if not isinstance(part, TensorImages):
            raise ValueError(
                f"save_task needs TensorImages splits; {task.name}/{split} is a "
                f"{type(part).__name__}"
            )
        tensors[f"{split}_images"], tensors[f"{split}_labels"] = part.images, part.labels
    meta = {"name": task.name, "classnames": list(task.classnames),
            "templates": list(task.templates)}  # fmt: skip
    vectors.save(tensors, path, metadata=vectors.metadata_json(meta))


def load_task(path: str | os.PathLike) -> Task:
    """The task ``save_task`` wrote to ``path``.

    Raises:
        ValueError: The file is missing or lacks a split's tensors or the task metadata.
    """
    source = vectors.SafetensorsFile(path)
    meta = source.metadata
    want = [f"{s}_{part}" for s in SPLITS for part in ("images", "labels")]
    missing = [k for k in want if k not in source] + [
        k for k in ("name", "classnames", "templates") if k not in meta
    ]
    if missing:
        raise ValueError(f"{path} is not a saved task: it lacks {missing}")
    splits = {s: TensorImages(source[f"{s}_images"], source[f"{s}_labels"]) for s in SPLITS}
    return Task(
        meta["name"],
        tuple(json.loads(meta["classnames"])),
        tuple(json.loads(meta["templates"])),
        **splits,
    )
