"""Fine-tuning and evaluation over DataLoaders, for datasets that do not fit in memory; resumable.

``finetune_loader`` is the real-scale twin of ``train.finetune`` (same recipe, algorithms.md
§4.1: AdamW, warm-up then cosine, gradient-norm clipping at 1.0, frozen head, image tower only)
and reuses its schedule and optimizer helpers. What differs is where the batches come from:

* ``StepBatches`` cuts step s of a run into the images and augmentation seeds that step uses,
  from ``seed`` and s alone. Each epoch is one seeded permutation (the last batch of an epoch
  may be short, as a DataLoader without drop_last gives, so ``steps_for`` counts
  ``ceil(n / batch)`` batches per epoch, Task Arithmetic's ``len(loader)``); each image of an
  epoch gets its own augmentation seed, applied under ``torch.random.fork_rng`` in whichever
  process decodes it. So the batch stream does not depend on the number of workers, and a run
  resumed at step s sees exactly the batches an uninterrupted run sees.
* A resume checkpoint (image tower, optimizer, step, global RNG state, and a fingerprint of the
  run's settings) is written every ``checkpoint_every`` steps, atomically (temporary file, then
  rename), loaded with ``torch.load(weights_only=True)``, and deleted after a successful finish.
  With the same seed, a run killed and restarted ends bit-identical to an uninterrupted one on
  the CPU (tests/test_resume.py kills a real subprocess).

On CUDA the forward runs under bf16 autocast, batches come from pinned memory, and the weights and
optimizer state stay float32. ``device="auto"`` picks CUDA when present.
"""

from __future__ import annotations

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
import torch.nn.functional as F
from open_clip import get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torch.utils.data import DataLoader, Dataset, Sampler

from mergeloom.clip import StateDict, image_encoder_state, load_image_encoder, pick_device
from mergeloom.train import Log, _adamw, _check, _update, cosine_schedule

logger = logging.getLogger(__name__)


def transforms(model: open_clip.CLIP) -> tuple:
    """(train, val) transforms of open_clip for ``model``: PIL image -> normalized tensor.

    Train is RandomResizedCrop(scale 0.9-1.0, bicubic) as open_clip_train; val resizes and
    centre-crops. Evaluation always uses val (algorithms.md §7 trap 19).
    """
    cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), get_model_preprocess_cfg(model)))
    return image_transform_v2(cfg, is_train=True), image_transform_v2(cfg, is_train=False)


def check_head(head: torch.Tensor, num_classes: int, what: str = "data") -> None:
    """Raise ValueError unless the head has one column per class of the data."""
    if head.ndim != 2 or head.shape[1] != num_classes:
        raise ValueError(
            f"class-count mismatch: the head has {head.shape[-1]} classes (shape "
            f"{tuple(head.shape)}), the {what} has {num_classes}"
        )


def steps_for(n_images: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps of ``epochs`` passes over ``n_images`` (short last batch counted)."""
    if n_images < 1 or batch_size < 1 or epochs <= 0:
        raise ValueError(
            f"need n_images, batch_size >= 1 and epochs > 0, got {n_images}, {batch_size}, {epochs}"
        )
    return max(1, round(epochs * math.ceil(n_images / batch_size)))


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
    """``(transform(image), label)`` of a ``(PIL image, label)`` dataset.

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
    """The checkpoint at ``path`` (tensors and plain containers only), or None if absent."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _resume(path: Path | None, fingerprint: str, model, optimizer) -> int:
    """Load a matching checkpoint into model and optimizer; the step to continue from."""
    ckpt = load_checkpoint(path) if path is not None else None
    if ckpt is None:
        return 0
    if ckpt.get("fingerprint") != fingerprint:
        logger.warning("ignoring resume checkpoint %s: it belongs to another run", path)
        return 0
    load_image_encoder(model, ckpt["visual"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    if torch.cuda.is_available() and ckpt.get("cuda_rng"):
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    logger.info("resuming from %s at step %d", path, ckpt["step"])
    return int(ckpt["step"])


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


# ---------------------------------------------------------------- loops


def _accumulated_step(model, head, x, y, optimizer, grad_clip, parts: int):
    """One optimizer step over (x, y) in ``parts`` micro-batches: the summed gradients are those
    of the batch mean, also for a short last batch. Returns the batch loss and logits."""
    optimizer.zero_grad(set_to_none=True)
    losses, outs = [], []
    for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True):
        with _autocast(x.device):
            out = model.encode_image(xs, normalize=True) @ head  # (b, C)
        loss = F.cross_entropy(out.float(), ys, reduction="sum") / len(y)
        loss.backward()
        losses.append(loss.detach())
        outs.append(out.detach())
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return torch.stack(losses).sum(), torch.cat(outs)


def finetune_loader(
    model: open_clip.CLIP,
    head: torch.Tensor,
    dataset: Dataset,
    *,
    transform,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    seed: int,
    device: str | torch.device = "auto",
    num_workers: int = 0,
    grad_clip: float | None = 1.0,
    accumulate: int = 1,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    num_classes: int | None = None,
    log: Log | None = None,
) -> StateDict:
    """Fine-tune ``model.visual`` in place on a ``(PIL image, label)`` dataset through ``head``.

    Args:
        head: (embed_dim, C) frozen zero-shot head; labels must lie in 0..C-1.
        transform: PIL image -> normalized tensor (``transforms(model)[0]``).
        device: "auto", "cpu", "cuda[:N]" or a torch.device.
        num_workers: DataLoader worker processes (0: decode in this process).
        accumulate: Split each batch into this many micro-batches whose gradients are summed
            before the step (memory for time; the protocol's ViT-L-14 uses 128 = 2 x 64).
        checkpoint: Resume file, kept outside any DVC output; None: no checkpoints.
        checkpoint_every: Write ``checkpoint`` every this many steps (0: never).
        num_classes: The data's class count, checked against the head's when given.
        log: Called as ``log(step, {"loss", "accuracy", "lr"})``.

    Returns:
        The fine-tuned ``image_encoder_state(model)``.

    Raises:
        ValueError: Bad hyperparameters, an empty dataset, or a class-count mismatch between
            the head and the data (both numbers named).
    """
    if num_classes is not None:
        check_head(head, num_classes)
    _check(steps, batch_size, lr, warmup_steps, len(dataset), len(dataset))
    if accumulate < 1 or batch_size % accumulate:
        raise ValueError(
            f"accumulate must be >= 1 and divide batch_size {batch_size}, got {accumulate}"
        )
    if checkpoint_every < 0 or num_workers < 0:
        raise ValueError(
            f"checkpoint_every and num_workers must be >= 0, got {checkpoint_every}, {num_workers}"
        )
    device = pick_device(device) if isinstance(device, str) else device
    n_classes = head.shape[1]
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "wd": weight_decay,
        "warmup": warmup_steps,
        "seed": seed,
        "n": len(dataset),
        "clip": grad_clip,
        "accumulate": accumulate,
    }
    fingerprint = _fingerprint(model, head, settings) if checkpoint is not None else ""
    torch.manual_seed(seed)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    try:
        model.to(device).train()
        head = head.detach().to(device)
        optimizer = _adamw(list(model.visual.parameters()), lr, weight_decay, device)
        start = _resume(checkpoint, fingerprint, model, optimizer)
        sampler = StepBatches(len(dataset), batch_size, steps, seed, start)
        loader = _loader(
            Transformed(dataset, transform), device, num_workers, batch_sampler=sampler
        )
        for step, (x, y) in enumerate(loader, start=start):
            if int(y.max()) >= n_classes or int(y.min()) < 0:
                raise ValueError(
                    f"class-count mismatch: a label {int(y.max())} in the data, but "
                    f"the head has {n_classes} classes"
                )
            for group in optimizer.param_groups:
                group["lr"] = lr * cosine_schedule(step, total=steps, warmup=warmup_steps)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if accumulate == 1:
                with _autocast(device):
                    out = model.encode_image(x, normalize=True) @ head  # (B, C)
                loss = F.cross_entropy(out.float(), y)
                _update(optimizer, loss, grad_clip)
            else:
                loss, out = _accumulated_step(model, head, x, y, optimizer, grad_clip, accumulate)
            if log is not None:
                accuracy = (out.argmax(dim=1) == y).float().mean().item()
                lr_now = optimizer.param_groups[0]["lr"]
                log(step, {"loss": loss.item(), "accuracy": accuracy, "lr": lr_now})
            done = step + 1
            due = checkpoint_every > 0 and done % checkpoint_every == 0 and done < steps
            if checkpoint is not None and due:  # no checkpoint after the last step
                _save_resume(checkpoint, fingerprint, done, model, optimizer)
    finally:
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return image_encoder_state(model)


def predict_loader(
    model: open_clip.CLIP,
    head: torch.Tensor,
    dataset: Dataset,
    *,
    transform,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) labels, int64 on the CPU, of ``dataset`` under the val ``transform``."""
    if batch_size < 1 or len(dataset) == 0:
        raise ValueError(
            f"need batch_size >= 1 and a non-empty dataset, got {batch_size}, {len(dataset)} images"
        )
    device = pick_device(device) if isinstance(device, str) else device
    model.to(device).eval()
    head = head.to(device)
    loader = _loader(
        Transformed(dataset, transform), device, num_workers, batch_size=batch_size, shuffle=False
    )
    preds, labels = [], []
    with torch.inference_mode(), _autocast(device):
        for x, y in loader:
            feats = model.encode_image(x.to(device, non_blocking=True), normalize=True)
            preds.append((feats @ head).argmax(dim=1).cpu())
            labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def accuracy_loader(
    model: open_clip.CLIP, head: torch.Tensor, dataset: Dataset, *, num_classes: int, **kwargs
) -> float:
    """Top-1 accuracy in [0, 1]; ``num_classes`` (the data's) must match the head's.

    Raises:
        ValueError: The head and the data have different class counts.
    """
    check_head(head, num_classes)
    preds, labels = predict_loader(model, head, dataset, **kwargs)
    return (preds == labels).float().mean().item()
