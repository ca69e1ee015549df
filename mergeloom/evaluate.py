"""Evaluation: predicted labels and top-1 accuracy of a CLIP image encoder with a zero-shot head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import open_clip
import torch

from mergeloom.clip import load_image_encoder, normalize_images

if TYPE_CHECKING:
    from mergeloom.protocol import EvalSet


def _ready(model: open_clip.CLIP, device: torch.device) -> None:
    """Eval mode on ``device``, touching the module tree only when needed: ``.to()`` and
    ``.eval()`` walk every submodule, which dominated sweeps of hundreds of evaluations."""
    if model.training:
        model.eval()
    if next(model.parameters()).device != device:
        model.to(device)


def features(
    model: open_clip.CLIP,
    images: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device,
) -> torch.Tensor:
    """L2-normalized image features (N, embed_dim) on ``device``, one batch at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    _ready(model, device)
    with torch.inference_mode():
        parts = [
            model.encode_image(
                normalize_images(model, images[start : start + batch_size].to(device)),
                normalize=True,
            )
            for start in range(0, len(images), batch_size)
        ]
    return torch.cat(parts) if parts else torch.empty(0, device=device)


def predict(
    model: open_clip.CLIP,
    head: torch.Tensor,
    images: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device,
) -> torch.Tensor:
    """Arg-max class of each image, as an int64 CPU tensor of length N.

    Runs in eval mode under ``torch.inference_mode`` one batch at a time, so only one batch of
    images sits on the device.

    Args:
        head: (embed_dim, C) zero-shot head.
        images: (N, 3, S, S) in [0, 1], on any device.

    Raises:
        ValueError: ``batch_size < 1``.
    """
    feats = features(model, images, batch_size=batch_size, device=device)
    return (feats @ head.to(feats.device)).argmax(dim=1).cpu()


def accuracy(
    model: open_clip.CLIP,
    head: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` with ``head`` on ``images``.

    Raises:
        ValueError: No images, or a different number of labels than images.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(
            f"accuracy needs as many labels as images (at least one), "
            f"got {len(images)} images and {len(labels)} labels"
        )
    preds = predict(model, head, images, batch_size=batch_size, device=device)
    return (preds == labels.cpu()).float().mean().item()


def score(
    model: open_clip.CLIP,
    visual: Mapping[str, torch.Tensor],
    eval_sets: Sequence[EvalSet],
    *,
    batch_size: int,
    device: str | torch.device,
    splits: Sequence[str] = ("val", "test"),
) -> dict[str, dict[str, float]]:
    """Accuracy on each split of each set, with ``visual`` loaded as the image encoder.

    All images go through the encoder in one stream of batches, then each set's head is
    applied to its slice of the features: a sweep scores hundreds of merged encoders.
    """
    load_image_encoder(model, visual)
    parts = [(s, split, getattr(s, split)) for s in eval_sets for split in splits]
    for s, split, part in parts:
        if len(part.images) == 0 or len(part.images) != len(part.labels):
            raise ValueError(f"{s.name}/{split}: needs as many labels as images (at least one)")
    feats = features(model, torch.cat([part.images for _, _, part in parts]),
                     batch_size=batch_size, device=device)  # fmt: skip
    scores: dict[str, dict[str, float]] = {}
    start = 0
    for s, split, part in parts:
        chunk = feats[start : start + len(part.images)]
        start += len(part.images)
        hits = (chunk @ s.head.to(chunk.device)).argmax(dim=1).cpu() == part.labels
        scores.setdefault(s.name, {})[split] = hits.float().mean().item()
    return scores
