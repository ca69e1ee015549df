"""A scorer for the baseline, merge and weave stages: theta_0's CLIP with one image tower swapped
in per evaluation, scored on evaluation sets (mergeloom.evaluate, the one evaluation path)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from mergeloom import clip, evaluate, loops, vectors
from mergeloom.protocol import EvalSet
from mergeloom.setups import in_memory
from mergeloom.vectors import StateDict

Score = Callable[..., dict[str, dict[str, float]]]


def scorer(
    model_name: str,
    pretrained: str | Path,
    *,
    device: str,
    batch_size: int,
    num_workers: int,
) -> tuple[Score, StateDict]:
    """(score(visual, eval_sets, splits=("val", "test")), theta_0's image tower).

    ``pretrained`` is the full CLIP state (text tower included) saved by the pretrain stage.
    DataLoader workers start only for sets read from disk (``num_workers`` for those).
    """
    model, _ = clip.load_clip(model_name)
    clip.load_full_state(model, vectors.load(pretrained))
    _, val_tf = loops.transforms(model)
    target = clip.pick_device(device)

    def score(
        visual: StateDict, eval_sets: Sequence[EvalSet], splits: Sequence[str] = ("val", "test")
    ) -> dict[str, dict[str, float]]:
        on_disk = any(not in_memory(getattr(s, split)) for s in eval_sets for split in splits)
        return evaluate.score(model, visual, eval_sets, transform=val_tf, batch_size=batch_size,
                              device=target, num_workers=num_workers if on_disk else 0,
                              splits=tuple(splits))  # fmt: skip

    return score, clip.image_encoder_state(model)
