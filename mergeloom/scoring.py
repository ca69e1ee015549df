"""A scorer for the baseline, merge and weave stages: theta_0's image tower with one update (or
one whole image tower) loaded per evaluation, scored on evaluation sets through
``mergeloom.evaluate``, the one evaluation path.

Memory is what a stage holds at scale (8 ViT-B/32 experts, BENCHMARKS.md): the model without its
text tower (heads are precomputed), theta_0 read lazily from its file, and the update being
scored, written into the model key by key; no merged state dict is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from mergeloom import clip, evaluate, loops, setups, vectors
from mergeloom.device import pick_device
from mergeloom.protocol import EvalSet, Problem
from mergeloom.setups import in_memory

Score = Callable[..., dict[str, dict[str, float]]]


def scorer(
    model_name: str,
    pretrained: str | Path,
    pretrained_visual: str | Path,
    *,
    device: str,
    batch_size: int,
    num_workers: int,
) -> Score:
    """``score(eval_sets, *, delta=None, visual=None, splits=("val", "test"))``.

    Give exactly one of ``delta`` (an update of theta_0's image tower, e.g. a merged task vector
    or a lazy lambda candidate) or ``visual`` (a whole image tower, e.g. an expert).
    ``pretrained`` is the full CLIP state saved by the pretrain stage, ``pretrained_visual`` its
    image tower. DataLoader workers start only for sets read from disk.
    """
    model, _ = clip.load_clip(model_name)
    clip.load_full_state(model, vectors.load(pretrained))
    clip.drop_text_tower(model)
    theta0 = vectors.SafetensorsFile(pretrained_visual)
    _, val_tf = loops.transforms(model)
    target = pick_device(device)

    def score(
        eval_sets: Sequence[EvalSet],
        *,
        delta: Mapping[str, torch.Tensor] | None = None,
        visual: Mapping[str, torch.Tensor] | None = None,
        splits: Sequence[str] = ("val", "test"),
    ) -> dict[str, dict[str, float]]:
        if (delta is None) == (visual is None):
            raise ValueError("score: give exactly one of delta= and visual=")
        if delta is not None:
            clip.load_image_encoder_update(model, theta0, delta)
        else:
            clip.load_image_encoder(model, visual)
        on_disk = any(not in_memory(getattr(s, split)) for s in eval_sets for split in splits)
        return evaluate.score(model, None, eval_sets, transform=val_tf, batch_size=batch_size,
                              device=target, num_workers=num_workers if on_disk else 0,
                              splits=tuple(splits))  # fmt: skip

    return score


def for_units(
    params: Mapping,
    runtime: Mapping,
    *,
    pretrained: str | Path,
    pretrained_visual: str | Path,
    data_dir: Path,
    heads_dir: Path,
) -> tuple[dict[str, list[Problem]], Score]:
    """(unit -> merge problems, scorer): what the baseline, merge and weave stages start from.

    ``params`` holds the model, data and setups sections; ``runtime`` the runtime settings
    (device, eval_batch_size, num_workers, datasets_root).
    """
    by_unit = setups.unit_problems(params["setups"], params["data"], data_dir=data_dir,
                                   heads_dir=heads_dir,
                                   datasets_root=runtime["datasets_root"])  # fmt: skip
    score = scorer(params["model"]["name"], pretrained, pretrained_visual,
                   device=runtime["device"], batch_size=runtime["eval_batch_size"],
                   num_workers=runtime["num_workers"])  # fmt: skip
    return by_unit, score
