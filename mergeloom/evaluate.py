"""Evaluation: image features and top-1 accuracy of a CLIP image encoder with zero-shot heads.

One path for every dataset of ``(image, label)``. A TensorImages (or a Subset / Relabeled of
one) is batched by slicing its tensor: the embedded pipeline scores about a thousand merged
encoders, and a DataLoader's per-item Python would dominate there. Other datasets go through a
DataLoader. Both give the same batches, hence the same features. Features are computed in eval
mode under ``torch.inference_mode``, with bf16 autocast on CUDA only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import open_clip
import torch
from torch.utils.data import Dataset, Subset

from mergeloom import loops
from mergeloom.clip import load_image_encoder
from mergeloom.device import pick_device
from mergeloom.tasks import Relabeled, labels_of

if TYPE_CHECKING:
    from mergeloom.protocol import EvalSet

View = tuple[torch.Tensor, torch.Tensor | None]  # (images, rows or None for all)


def _device(device: str | torch.device) -> torch.device:
    device = pick_device(device) if isinstance(device, str) else torch.device(device)
    if device.type == "cuda" and device.index is None:  # as parameters report it
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _ready(model: open_clip.CLIP, device: torch.device) -> None:
    """Eval mode on ``device``, touching the module tree only when needed: ``.to()`` and
    ``.eval()`` walk every submodule, which dominated sweeps of hundreds of evaluations."""
    if model.training:
        model.eval()
    if next(model.parameters()).device != device:
        model.to(device)


def _check_batch_size(batch_size: int, num_workers: int) -> None:
    if isinstance(batch_size, bool) or batch_size < 1 or num_workers < 0:
        raise ValueError(
            f"need batch_size >= 1 and num_workers >= 0, got {batch_size!r}, {num_workers!r}"
        )


def _rows(views: Sequence[View], batch_size: int) -> Iterator[torch.Tensor]:
    """The images of several tensor views as one stream of ``batch_size`` batches (the last
    may be short), each cut straight from the tensors."""
    pieces: list[torch.Tensor] = []
    filled = 0
    for images, rows in views:
        n = len(images) if rows is None else len(rows)
        pos = 0
        while pos < n:
            take = min(batch_size - filled, n - pos)
            sel = slice(pos, pos + take)
            pieces.append(images[sel] if rows is None else images[rows[sel]])
            filled, pos = filled + take, pos + take
            if filled == batch_size:
                yield pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                pieces, filled = [], 0
    if pieces:
        yield pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _embed(model: open_clip.CLIP, x: torch.Tensor) -> torch.Tensor:
    with loops._autocast(x.device):
        return model.encode_image(x, normalize=True).float()


def _empty(model: open_clip.CLIP, device: torch.device) -> torch.Tensor:
    return torch.empty(0, model.visual.output_dim, device=device)


def _encode_views(model, views: Sequence[View], transform, batch_size: int, device):
    """Features (N, e) on ``device`` of the rows of ``views``, in order, batched across them."""
    _ready(model, device)
    with torch.inference_mode():
        parts = [
            _embed(model, loops.transform_batch(transform, x.to(device, non_blocking=True)))
            for x in _rows(views, batch_size)
        ]
    return torch.cat(parts) if parts else _empty(model, device)


def _encode_loader(model, dataset: Dataset, transform, batch_size: int, device, num_workers):
    """(features (N, e) on ``device``, labels (N,) on the CPU) through a DataLoader."""
    _ready(model, device)
    data = loops.Transformed(dataset, transform)
    loader = loops._loader(data, device, num_workers, batch_size=batch_size, shuffle=False)
    feats, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            feats.append(_embed(model, x.to(device, non_blocking=True)))
            labels.append(torch.as_tensor(y, dtype=torch.int64))
    if not feats:
        return _empty(model, device), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


def _encode(model, dataset, transform, batch_size, device, num_workers):
    """(features on ``device``, labels on the CPU) of a dataset, by the fastest path."""
    _check_batch_size(batch_size, num_workers)
    view = loops.tensor_view(dataset)
    if view is not None:
        feats = _encode_views(model, [view], transform, batch_size, device)
        return feats, labels_of(dataset)
    return _encode_loader(model, dataset, transform, batch_size, device, num_workers)


def features(
    model: open_clip.CLIP,
    dataset: Dataset,
    *,
    transform,
    batch_size: int,
    device: str | torch.device,
    num_workers: int = 0,
) -> torch.Tensor:
    """L2-normalized float32 image features (N, embed_dim) on ``device``, in dataset order.

    Args:
        transform: image -> normalized tensor, the val one (``loops.transforms(model)[1]``).
        device: "auto", "cpu", "cuda[:N]" or a torch.device.

    Raises:
        ValueError: ``batch_size < 1`` or ``num_workers < 0``.
    """
    device = _device(device)
    return _encode(model, dataset, transform, batch_size, device, num_workers)[0]


def accuracy(
    model: open_clip.CLIP,
    head: torch.Tensor,
    dataset: Dataset,
    *,
    transform,
    batch_size: int,
    device: str | torch.device,
    num_workers: int = 0,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` with ``head`` (embed_dim, C) on ``dataset``.

    Raises:
        ValueError: An empty dataset, bad batch size, or ``num_classes`` (the data's) differs
            from the head's class count (both named).
    """
    if num_classes is not None:
        loops.check_head(head, num_classes)
    if len(dataset) == 0:
        raise ValueError("accuracy needs a non-empty dataset, got 0 images")
    device = _device(device)
    feats, labels = _encode(model, dataset, transform, batch_size, device, num_workers)
    with torch.inference_mode():
        preds = (feats @ head.to(device, torch.float32)).argmax(dim=1).cpu()
    return (preds == labels.cpu()).float().mean().item()


def _ancestors(dataset: Dataset) -> Iterator[Dataset]:
    while isinstance(dataset, (Subset, Relabeled)):
        dataset = dataset.dataset
        yield dataset


def _derive(dataset: Dataset, done: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """(features, labels) of ``dataset`` from those of an already encoded ancestor, or None."""
    if id(dataset) in done:
        return done[id(dataset)]
    if not isinstance(dataset, (Subset, Relabeled)):
        return None
    parent = _derive(dataset.dataset, done)
    if parent is None:
        return None
    idx = torch.as_tensor(dataset.indices, dtype=torch.int64)
    labels = dataset.labels if isinstance(dataset, Relabeled) else parent[1][idx]
    done[id(dataset)] = (parent[0][idx.to(parent[0].device)], labels)
    return done[id(dataset)]


def score(
    model: open_clip.CLIP,
    visual: Mapping[str, torch.Tensor] | None,
    eval_sets: Sequence[EvalSet],
    *,
    transform,
    batch_size: int,
    device: str | torch.device,
    num_workers: int = 0,
    splits: Sequence[str] = ("val", "test"),
) -> dict[str, dict[str, float]]:
    """{set name: {split: accuracy}} with ``visual`` loaded as the image encoder (None: the
    model's image encoder as it is, e.g. after ``clip.load_image_encoder_update``).

    Every distinct dataset is encoded once, then each set's head is applied to its features:
    a sweep scores hundreds of merged encoders. A set whose split is a Subset / Relabeled of
    another set's split (the continual diagnostics) reuses that split's features, and all
    tensor splits go through the encoder as one stream of batches.

    Raises:
        ValueError: An empty split (named), or a bad batch size.
    """
    _check_batch_size(batch_size, num_workers)
    device = _device(device)
    if visual is not None:
        load_image_encoder(model, visual)
    parts = [(s, split, getattr(s, split)) for s in eval_sets for split in splits]
    for s, split, part in parts:
        if len(part) == 0:
            raise ValueError(f"{s.name}/{split}: needs at least one image, got 0")
    distinct = {id(part): part for _, _, part in parts}
    roots = [d for d in distinct.values() if not any(id(a) in distinct for a in _ancestors(d))]
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    tensor_roots = [(d, loops.tensor_view(d)) for d in roots]
    tensor_roots = [(d, v) for d, v in tensor_roots if v is not None]
    if tensor_roots:
        feats = _encode_views(model, [v for _, v in tensor_roots], transform, batch_size, device)
        start = 0
        for d, _ in tensor_roots:
            done[id(d)] = (feats[start : start + len(d)], labels_of(d))
            start += len(d)
    for d in roots:
        if id(d) not in done:
            done[id(d)] = _encode_loader(model, d, transform, batch_size, device, num_workers)
    scores: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for s, split, part in parts:
            feats, labels = _derive(part, done)
            preds = (feats @ s.head.to(feats.device, torch.float32)).argmax(dim=1).cpu()
            scores.setdefault(s.name, {})[split] = (preds == labels.cpu()).float().mean().item()
    return scores
