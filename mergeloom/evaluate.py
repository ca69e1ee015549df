"""Evaluation: predicted labels and top-1 accuracy of a CLIP image encoder with a zero-shot head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import open_clip
import torch

from mergeloom.clip import load_image_encoder, logits

if TYPE_CHECKING:
    from mergeloom.protocol import EvalSet


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
    if batch_size < 1:
        raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    model.to(device).eval()
    head = head.to(device)
    with torch.inference_mode():
        preds = [
            logits(model, head, images[start : start + batch_size].to(device)).argmax(dim=1).cpu()
            for start in range(0, len(images), batch_size)
        ]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


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
    """Accuracy on each split of each set, with ``visual`` loaded as the image encoder."""
    load_image_encoder(model, visual)
    return {
        s.name: {
            split: accuracy(
                model,
                s.head,
                getattr(s, split).images,
                getattr(s, split).labels,
                batch_size=batch_size,
                device=device,
            )
            for split in splits
        }
        for s in eval_sets
    }
