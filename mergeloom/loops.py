"""Data plumbing shared by ``mergeloom.train.finetune`` and ``mergeloom.evaluate``.

One fine-tuning loop and one evaluation path take any map-style dataset of ``(image, label)``:
PIL images from disk or ``(3, S, S)`` tensors (``mergeloom.tasks.TensorImages``). What they
share lives here:

* ``transforms(model)``: open_clip's train/val preprocessing for PIL images; a tensor image is
  only standardised (it is already at the model's size, and augmenting it would change the
  in-memory digits' fixed pixels).
* ``StepBatches`` cuts step s of a run into the images and augmentation seeds that step uses,
  from ``seed`` and s alone. Each epoch is one seeded permutation (the last batch of an epoch
  may be short, as a DataLoader without drop_last gives, so ``train.steps_for`` counts
  ``ceil(n / batch)`` batches per epoch, Task Arithmetic's ``len(loader)``); each image of an
  epoch gets its own augmentation seed, applied under ``torch.random.fork_rng`` in whichever
  process decodes it (``Transformed``). So the batch stream does not depend on the number of
  workers, and a run resumed at step s sees exactly the batches an uninterrupted run sees.
* ``tensor_view`` finds the one tensor behind a TensorImages (or a Subset / Relabeled of one),
  so that batches can be sliced from it directly instead of item by item.
* Resume checkpoints (image tower, optimizer, step, global RNG state, and a fingerprint of the
  run's settings), written atomically (temporary file, then rename) and loaded with
  ``torch.load(weights_only=True)``. An unusable one (truncated, corrupt, malformed) is named
  in a warning and deleted, and the run starts afresh.

On CUDA the forward runs under bf16 autocast and batches come from pinned memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip import get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from mergeloom.clip import image_encoder_state, load_image_encoder
from mergeloom.tasks import Relabeled, TensorImages

logger = logging.getLogger(__name__)


class ImageTransform:
    """One of a model's preprocessing transforms: a PIL image goes through open_clip's
    pipeline; a tensor image (3, S, S) or batch (B, 3, S, S) in [0, 1] at the model's size is
    only standardised with the model's mean and std (no augmentation, no resize)."""

    def __init__(self, pil, mean, std, size: tuple[int, int]) -> None:
        self.pil, self.size = pil, tuple(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image):
        if not isinstance(image, torch.Tensor):
            return self.pil(image)
        if image.ndim not in (3, 4) or image.shape[-3] != len(self.mean):
            raise ValueError(
                f"a tensor image must be ({len(self.mean)}, S, S) or (B, {len(self.mean)}, S, S), "
                f"got shape {tuple(image.shape)}"
            )
        if tuple(image.shape[-2:]) != self.size:
            raise ValueError(
                f"tensor images are {tuple(image.shape[-2:])} but the model takes {self.size}: "
                "tensor images are not resized, build them at the model's image size"
            )
        if not image.is_floating_point():
            raise ValueError(f"tensor images must be floats in [0, 1], got {image.dtype}")
        mean, std = self.mean.to(image.device), self.std.to(image.device)
        return (image - mean) / std

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, pil={self.pil!r})"


def transforms(model: open_clip.CLIP) -> tuple[ImageTransform, ImageTransform]:
    """(train, val) transforms for ``model``: image -> normalized tensor.

    For PIL images, train is open_clip_train's RandomResizedCrop (scale 0.9-1.0, bicubic) and
    val resizes and centre-crops. For tensor images both only standardise, and refuse a size
    other than the model's. Evaluation always uses val (docs/methods.md#validation).
    """
    cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), get_model_preprocess_cfg(model)))
    size = (cfg.size, cfg.size) if isinstance(cfg.size, int) else tuple(cfg.size)
    return tuple(
        ImageTransform(image_transform_v2(cfg, is_train=is_train), cfg.mean, cfg.std, size)
        for is_train in (True, False)
    )


def check_head(head: torch.Tensor, num_classes: int, what: str = "data") -> None:
    """Raise ValueError unless the head has one column per class of the data."""
    if head.ndim != 2 or head.shape[1] != num_classes:
        raise ValueError(
            f"class-count mismatch: the head has {head.shape[-1]} classes (shape "
            f"{tuple(head.shape)}), the {what} has {num_classes}"
        )


def _epoch_plan(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(permutation, per-position augmentation seeds) of one epoch, from (seed, epoch) only."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch]).generate_state(2, np.uint64)
    gen = torch.Generator().manual_seed(int(state[0]) >> 1)
    perm = torch.randperm(n, generator=gen)
    aug = torch.randint(0, 2**62, (n,), generator=gen)
    return perm, aug


class StepBatches(Sampler):
    """Batches of ``(index, augmentation seed)`` for steps ``start .. steps - 1`` of a run."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, start: int = 0) -> None:
        self.n, self.batch_size, self.steps, self.seed, self.start = (
            n,
            batch_size,
            steps,
            seed,
            start,
        )
        self.per_epoch = math.ceil(n / batch_size)

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, plan = -1, None
        for step in range(self.start, self.steps):
            e, b = divmod(step, self.per_epoch)
            if e != epoch:
                epoch, plan = e, _epoch_plan(self.n, self.seed, e)
            perm, aug = plan
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield list(zip(perm[sl].tolist(), aug[sl].tolist(), strict=True))


class Transformed(Dataset):
    """``(transform(image), label)`` of an ``(image, label)`` dataset.

    An item asked for as ``(index, seed)`` is transformed under that seed without touching the
    caller's RNG, so random augmentation is a function of the seed alone.
    """

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, seed = item
            image, label = self.dataset[index]
            with torch.random.fork_rng(devices=[]):  # CPU generator only: CUDA's is untouched
                torch.default_generator.manual_seed(seed)
                return self.transform(image), label
        image, label = self.dataset[item]
        return self.transform(image), label


def _loader(dataset: Dataset, device: torch.device, num_workers: int, **kwargs) -> DataLoader:
    return DataLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        **kwargs,
    )


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def tensor_view(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(images tensor, row of each item or None for every row) when the items of ``dataset``
    are rows of one TensorImages, directly or through Subset / Relabeled; else None."""
    if isinstance(dataset, TensorImages):
        return dataset.images, None
    if isinstance(dataset, (Subset, Relabeled)):
        inner = tensor_view(dataset.dataset)
        if inner is None:
            return None
        images, rows = inner
        mine = torch.as_tensor(dataset.indices, dtype=torch.int64)
        return images, mine if rows is None else rows[mine]
    return None


def transform_batch(transform, images: torch.Tensor) -> torch.Tensor:
    """``transform`` applied to each image of a (B, 3, S, S) batch, stacked as a DataLoader
    would collate them; an ImageTransform does the whole batch in one go (same values)."""
    if isinstance(transform, ImageTransform):
        return transform(images)
    return torch.stack([transform(image) for image in images])


# ---------------------------------------------------------------- resume checkpoints


def _fingerprint(model: open_clip.CLIP, head: torch.Tensor, settings: Mapping) -> str:
    """Hash of the run's settings, head and starting image tower: a checkpoint of another run
    (other data size, params or initial weights, e.g. a changed previous expert) is ignored."""
    h = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16)
    h.update(head.detach().float().cpu().numpy().tobytes())
    for key, value in sorted(model.visual.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, state: Mapping) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path`` (tensors and plain containers only), or None if absent.

    Raises whatever ``torch.load`` raises for a file it cannot read (truncated, not a torch
    file, or holding objects other than tensors and plain containers): ``_resume`` turns that
    into a warning and a fresh start.
    """
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


class _BadCheckpoint(ValueError):
    """A resume checkpoint of this run whose content cannot be resumed from."""


def _reason(exc: BaseException) -> str:
    """Why, in one short line: the exception's type and its message's first sentence."""
    text = " ".join(str(exc).split()).split(". ")[0]
    if len(text) > 200:
        text = text[:197] + "..."
    if isinstance(exc, _BadCheckpoint):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _discard(path: Path, why: str) -> int:
    """Name an unusable checkpoint and why in one warning, delete it (so that no later run
    trips on it either), and return step 0: the run starts afresh."""
    logger.warning(
        "unusable resume checkpoint %s (%s): deleting it and training this expert from step 0",
        path,
        why,
    )
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # the next periodic checkpoint replaces it
        logger.warning("could not delete resume checkpoint %s (%s)", path, _reason(exc))
    return 0


def _check_rng(state, like: torch.Tensor, what: str) -> None:
    if not (
        isinstance(state, torch.Tensor) and state.dtype == like.dtype and state.shape == like.shape
    ):
        raise _BadCheckpoint(f"{what!r} is not a generator state like this machine's")


def _apply(ckpt: dict, model, optimizer) -> int:
    """Load a checkpoint of this run into model, optimizer and the RNGs; its step.

    Everything that can be checked is checked first, and the optimizer is put back if its
    state or the image tower does not load, so on ``_BadCheckpoint`` (or any error from
    loading) model, optimizer and RNGs are as they were.
    """
    missing = [key for key in ("step", "visual", "optimizer", "rng") if key not in ckpt]
    if missing:
        raise _BadCheckpoint(f"missing keys {missing}")
    step, visual, state = ckpt["step"], ckpt["visual"], ckpt["optimizer"]
    if type(step) is not int or step < 0:
        raise _BadCheckpoint(f"step {step!r} is not a non-negative int")
    if not isinstance(visual, Mapping) or not all(
        isinstance(v, torch.Tensor) and v.is_floating_point() for v in visual.values()
    ):
        raise _BadCheckpoint("'visual' is not a map of float tensors")
    if not isinstance(state, Mapping):
        raise _BadCheckpoint("'optimizer' is not an optimizer state")
    _check_rng(ckpt["rng"], torch.get_rng_state(), "rng")
    cuda_rng = ckpt.get("cuda_rng") or []
    if torch.cuda.is_available():
        if not isinstance(cuda_rng, (list, tuple)):
            raise _BadCheckpoint("'cuda_rng' is not a list of generator states")
        cuda_rng = cuda_rng[: torch.cuda.device_count()]
        for i, device_state in enumerate(cuda_rng):
            _check_rng(device_state, torch.cuda.get_rng_state(i), "cuda_rng")
    before = copy.deepcopy(optimizer.state_dict())
    try:
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.ndim and value.shape != p.shape:
                        raise _BadCheckpoint(
                            f"optimizer state {key!r} has shape {tuple(value.shape)}, "
                            f"its parameter {tuple(p.shape)}"
                        )
        load_image_encoder(model, visual)  # checks every key and shape before copying
    except BaseException:
        optimizer.load_state_dict(before)
        raise
    torch.set_rng_state(ckpt["rng"])
    if cuda_rng:
        torch.cuda.set_rng_state_all(cuda_rng)
    return step


def _resume(path: Path | None, fingerprint: str, model, optimizer) -> int:
    """Load a matching checkpoint into model and optimizer; the step to continue from.

    0 without a checkpoint; 0 with a warning for a checkpoint of another run (it is left
    alone: the next periodic checkpoint replaces it). An unusable one (unreadable, truncated,
    not a weights-only torch file, keys missing, a bad step, a state that does not load) is
    named with the reason in one warning and deleted, and the run starts afresh from step 0
    with model and optimizer untouched, exactly as without it.
    """
    if path is None:
        return 0
    try:
        ckpt = load_checkpoint(path)
    except Exception as exc:  # never weights_only=False: a bad file is dropped, not trusted
        return _discard(path, f"torch.load failed: {_reason(exc)}")
    if ckpt is None:
        return 0
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("fingerprint"), str):
        return _discard(path, "not a resume checkpoint: no fingerprint")
    if ckpt["fingerprint"] != fingerprint:
        logger.warning("ignoring resume checkpoint %s: it belongs to another run", path)
        return 0
    try:
        step = _apply(ckpt, model, optimizer)
    except Exception as exc:
        return _discard(path, _reason(exc))
    logger.info("resuming from %s at step %d", path, step)
    return step


def _save_resume(path: Path, fingerprint: str, step: int, model, optimizer) -> None:
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    save_checkpoint(
        path,
        {
            "fingerprint": fingerprint,
            "step": step,
            "visual": image_encoder_state(model),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng,
        },
    )
