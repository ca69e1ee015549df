"""Training loops: contrastive pretraining of a CLIP, and fine-tuning of its image tower.

``finetune`` is the one fine-tuning loop, for in-memory digits and benchmark datasets on disk
alike. It follows the Task Arithmetic recipe (docs/methods.md#multitask): AdamW, linear warm-up then
cosine decay to 0, gradient-norm clipping at 1.0, frozen zero-shot head, only ``model.visual``
trains. Batches come from ``loops.StepBatches`` (step s's images and augmentation seeds are a
function of ``seed`` and s alone), so a run is reproducible bit for bit on the CPU, whatever the
number of DataLoader workers, and resumable from a checkpoint (tests/test_resume.py kills a real
subprocess). A TensorImages dataset is batched by slicing its tensor, with the same values.
Inside an initialised ``torch.distributed`` process group (``stages/finetune.py`` under
``torchrun``), each rank trains on its share of every global batch and the gradients are summed
over the ranks: the expert is the single-process one up to floating-point reduction order.

``pretrain`` takes image tensors and captions; its batches are drawn by index with a seeded
generator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from mergeloom import loops
from mergeloom.clip import StateDict, Tokenizer, image_encoder_state, normalize_images
from mergeloom.device import pick_device
from mergeloom.progress import progress
from mergeloom.tasks import labels_of

logger = logging.getLogger(__name__)
Log = Callable[[int, dict[str, float]], None]


def cosine_schedule(step: int, *, total: int, warmup: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine to 0.

    Warm-up rises as ``(step + 1) / warmup``, as in Task Arithmetic's ``cosine_lr``. A warm-up
    longer than training is kept as the reference code has it: the rate never leaves warm-up and
    peaks at ``total / warmup`` (docs/methods.md#continual); ``finetune`` logs a warning then.

    Raises:
        ValueError: ``total < 1`` or ``warmup < 0``.
    """
    if total < 1 or warmup < 0:
        raise ValueError(f"cosine_schedule needs total >= 1 and warmup >= 0, got {total}, {warmup}")
    if step < warmup:
        return (step + 1) / warmup
    decayed = min((step - warmup) / max(total - warmup, 1), 1.0)  # clamped past the end
    return 0.5 * (1.0 + math.cos(math.pi * decayed))


def steps_for(n_images: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps of ``epochs`` passes over ``n_images`` (short last batch counted)."""
    if n_images < 1 or batch_size < 1 or epochs <= 0:
        raise ValueError(
            f"need n_images, batch_size >= 1 and epochs > 0, got {n_images}, {batch_size}, {epochs}"
        )
    return max(1, round(epochs * math.ceil(n_images / batch_size)))


def _check(steps: int, batch_size: int, lr: float, warmup_steps: int, n: int, m: int) -> None:
    if steps < 1 or batch_size < 1 or lr <= 0 or warmup_steps < 0:
        raise ValueError(
            f"need steps >= 1, batch_size >= 1, lr > 0, warmup_steps >= 0; got steps={steps}, "
            f"batch_size={batch_size}, lr={lr}, warmup_steps={warmup_steps}"
        )
    if n == 0 or n != m:
        raise ValueError(f"need as many targets as images (at least one), got {n} images, {m}")
    if warmup_steps > steps:
        logger.warning(
            "warm-up (%d steps) is longer than training (%d steps): the learning rate peaks "
            "at %.3g x lr and never decays",
            warmup_steps,
            steps,
            steps / warmup_steps,
        )


def _batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Index batches of ``min(batch_size, n)`` drawn without replacement, epoch after epoch.

    The last partial batch of each epoch is dropped, so no batch holds an image twice (a
    duplicate would be its own negative in the contrastive loss).
    """
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, n)
    drawn = 0
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            if drawn == steps:
                return
            drawn += 1
            yield perm[start : start + size]


def _scheduled(
    optimizer: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor],
    *,
    steps: int,
    warmup_steps: int,
    desc: str,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(step, batch indices)`` with the optimizer's learning rate set for that step."""
    for step, idx in enumerate(progress(batches, total=steps, desc=desc, unit="step")):
        factor = cosine_schedule(step, total=steps, warmup=warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = optimizer.defaults["lr"] * factor
        yield step, idx


def _adamw(params: list, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where PyTorch has a fused kernel (on the CPU it nearly halves the update of
    the 49408 x 64 token embedding that ``pretrain`` trains)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def pretrain(
    model: open_clip.CLIP,
    tokenizer: Tokenizer,
    images: torch.Tensor,
    captions: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    seed: int,
    device: str | torch.device,
    log: Log | None = None,
) -> None:
    """Train the whole CLIP contrastively (open_clip's ``ClipLoss``) on image-caption pairs.

    As in open_clip_train, gains, biases and ``logit_scale`` (tensors under 2-D) get no weight
    decay, and ``logit_scale`` is clamped to ln(100) after each step.

    Args:
        images: (N, 3, S, S) in [0, 1].
        captions: N strings, one per image.
        log: Called as ``log(step, {"loss": ..., "lr": ...})`` after each step.

    Raises:
        ValueError: Bad step count, batch size, learning rate or image/caption counts.
    """
    _check(steps, batch_size, lr, warmup_steps, len(images), len(captions))
    device = torch.device(device)
    torch.manual_seed(seed)
    texts = tokenizer(list(captions))  # (N, context_length)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = _adamw(groups, lr, weight_decay, device)
    clip_loss = open_clip.ClipLoss()
    batches = _batches(len(images), batch_size, steps, seed)
    for step, idx in _scheduled(
        optimizer, batches, steps=steps, warmup_steps=warmup_steps, desc="pretrain"
    ):
        x = normalize_images(model, images[idx.to(images.device)].to(device))
        image_features = model.encode_image(x, normalize=True)  # (B, e)
        text_features = model.encode_text(texts[idx].to(device), normalize=True)  # (B, e)
        loss = clip_loss(image_features, text_features, model.logit_scale.exp())
        _update(optimizer, loss, grad_clip=None)
        with torch.no_grad():  # as open_clip_train: a temperature below 1/100 destabilises
            model.logit_scale.clamp_(0, math.log(100))
        if log is not None:  # .item() syncs a GPU, so only when someone listens
            log(step, {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
    model.eval()


def _accumulated_step(model, head, x, y, optimizer, grad_clip, parts: int):
    """One optimizer step over (x, y) in ``parts`` micro-batches: the summed gradients are those
    of the batch mean, also for a short last batch. Returns the batch loss and logits."""
    optimizer.zero_grad(set_to_none=True)
    losses, outs = [], []
    for xs, ys in zip(x.chunk(parts), y.chunk(parts), strict=True):
        with loops._autocast(x.device):
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


def _train_step(model, head, x, y, optimizer, grad_clip, accumulate: int):
    """One optimizer step on the batch (x, y); its loss and logits (B, C)."""
    if accumulate > 1:
        return _accumulated_step(model, head, x, y, optimizer, grad_clip, accumulate)
    with loops._autocast(x.device):
        out = model.encode_image(x, normalize=True) @ head  # (B, C)
    loss = F.cross_entropy(out.float(), y)
    _update(optimizer, loss, grad_clip)
    return loss, out


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed process group; (0, 1) without."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _RankShare(Sampler):
    """One rank's share of each global batch: every ``world``-th item from ``rank``, so that the
    shares of all ranks are exactly the single-process batch. A share that would be empty (a
    short last batch with fewer images than ranks) is the batch's first image, weighed 0 by
    ``_shared_step``: a DataLoader cannot yield an empty batch, and every rank must step."""

    def __init__(self, sampler: loops.StepBatches, rank: int, world: int) -> None:
        self.sampler, self.rank, self.world = sampler, rank, world

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.sampler:
            yield batch[self.rank :: self.world] or batch[:1]


def _shared_step(model, head, x, y, optimizer, grad_clip, accumulate: int, total: int, real: bool):
    """One optimizer step of one rank on its share (x, y) of a global batch of ``total`` images.

    Each rank's loss is its images' summed cross-entropy divided by ``total`` and the gradients
    are summed over the ranks (before clipping): that is the gradient of the global batch mean,
    also for a short last batch split unevenly, where averaging the ranks' means would weigh
    images unequally. Every rank then takes the same step. ``real`` False: the share is a
    placeholder image that contributes nothing. Returns the global batch loss and accuracy.
    """
    optimizer.zero_grad(set_to_none=True)
    weight = 1.0 if real else 0.0
    stats = torch.zeros(2, device=x.device)  # summed loss / total, correct predictions
    for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate), strict=True):
        with loops._autocast(x.device):
            out = model.encode_image(xs, normalize=True) @ head  # (b, C)
        loss = F.cross_entropy(out.float(), ys, reduction="sum") * weight / total
        loss.backward()
        correct = (out.argmax(dim=1) == ys).sum() * weight
        stats += torch.stack([loss.detach(), correct.to(stats.dtype)])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        if p.grad is None:  # a parameter this share did not reach: it still joins the sum
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
    torch.distributed.all_reduce(stats)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return stats[0], stats[1] / total


def _same_start(start: int, device: torch.device) -> None:
    """Refuse ranks that resumed from different steps (a checkpoint replaced between reads)."""
    both = torch.tensor([start, -start], device=device)  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    if int(both[0]) != -int(both[1]):
        raise RuntimeError(
            f"ranks resumed from different steps ({-int(both[1])} to {int(both[0])}): "
            "rerun the stage, the resume checkpoint is now settled"
        )


def _train_batches(
    dataset: Dataset, transform, sampler: loops.StepBatches, device: torch.device, workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of each step. Rows of a TensorImages under an ImageTransform (no random
    augmentation on tensors) are sliced straight from its tensor, skipping the per-item
    DataLoader path that would give the same values."""
    view = loops.tensor_view(dataset)
    if view is not None and isinstance(transform, loops.ImageTransform):
        images, rows = view
        labels = labels_of(dataset)
        for batch in sampler:
            idx = torch.tensor([i for i, _ in batch], dtype=torch.int64)
            picked = images[idx if rows is None else rows[idx]]
            yield transform(picked.to(device, non_blocking=True)), labels[idx]
        return
    data = loops.Transformed(dataset, transform)
    yield from loops._loader(data, device, workers, batch_sampler=sampler)


def finetune(
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
    device: str | torch.device,
    grad_clip: float | None = 1.0,
    accumulate: int = 1,
    num_workers: int = 0,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    num_classes: int | None = None,
    log: Log | None = None,
) -> StateDict:
    """Fine-tune ``model.visual`` in place on an ``(image, label)`` dataset through ``head``.

    Everything but ``model.visual`` is frozen for the run (the text tower, and hence the head,
    must stay the pretrained ones so that task vectors live in the image tower only); the
    ``requires_grad`` flags are restored afterwards and the model is left in eval mode.

    Args:
        head: (embed_dim, C) frozen zero-shot head; labels must lie in 0..C-1.
        dataset: PIL images (from disk) or tensor images (TensorImages) with int labels.
        transform: image -> normalized tensor (``loops.transforms(model)[0]``).
        device: "auto", "cpu", "cuda[:N]" or a torch.device.
        grad_clip: Maximum gradient norm, None for no clipping.
        accumulate: Split each batch into this many micro-batches whose gradients are summed
            before the step (memory for time; the protocol's ViT-L-14 uses 128 = 2 x 64).
        num_workers: DataLoader worker processes (0: decode in this process).
        checkpoint: Resume file, kept outside any DVC output; None: no checkpoints.
        checkpoint_every: Write ``checkpoint`` every this many steps (0: never).
        num_classes: The data's class count, checked against the head's when given.
        log: Called as ``log(step, {"loss", "accuracy", "lr"})``; accuracy is the batch's.

    In a torch.distributed process group of N ranks, every rank calls this with the same
    arguments; rank r trains on items r, r + N, ... of each global batch of ``batch_size``
    (which N must divide), and only rank 0 writes and deletes ``checkpoint``. Loss and accuracy
    given to ``log`` are those of the global batch.

    Returns:
        The fine-tuned ``image_encoder_state(model)``.

    Raises:
        ValueError: Bad hyperparameters, an empty dataset, or a class-count mismatch between
            the head and the data (both numbers named).
    """
    if num_classes is not None:
        loops.check_head(head, num_classes)
    _check(steps, batch_size, lr, warmup_steps, len(dataset), len(dataset))
    if accumulate < 1 or batch_size % accumulate:
        raise ValueError(
            f"accumulate must be >= 1 and divide batch_size {batch_size}, got {accumulate}"
        )
    if checkpoint_every < 0 or num_workers < 0:
        raise ValueError(
            f"checkpoint_every and num_workers must be >= 0, got {checkpoint_every}, {num_workers}"
        )
    rank, world = _world()
    if batch_size % world:
        raise ValueError(
            f"batch_size {batch_size} must be divisible by the {world} processes training "
            "together (MERGELOOM_NPROC_PER_NODE)"
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
    fingerprint = loops._fingerprint(model, head, settings) if checkpoint is not None else ""
    torch.manual_seed(seed)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    try:
        model.to(device).train()
        head = head.detach().to(device)
        optimizer = _adamw(list(model.visual.parameters()), lr, weight_decay, device)
        start = loops._resume(checkpoint, fingerprint, model, optimizer)
        if world > 1:
            _same_start(start, device)
        sampler = loops.StepBatches(len(dataset), batch_size, steps, seed, start)
        share = sampler if world == 1 else _RankShare(sampler, rank, world)
        batches = _train_batches(dataset, transform, share, device, num_workers)
        shown = progress(batches, total=steps, initial=start, desc="finetune", unit="step")
        for step, (x, y) in enumerate(shown if rank == 0 else batches, start=start):
            bad = y[(y < 0) | (y >= n_classes)]
            if len(bad):
                raise ValueError(
                    f"class-count mismatch: a label {int(bad[0])} in the data, but "
                    f"the head has {n_classes} classes"
                )
            for group in optimizer.param_groups:
                group["lr"] = lr * cosine_schedule(step, total=steps, warmup=warmup_steps)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if world > 1:
                total = min(batch_size, len(dataset) - step % sampler.per_epoch * batch_size)
                loss, accuracy = _shared_step(model, head, x, y, optimizer, grad_clip,
                                              accumulate, total, real=rank < total)  # fmt: skip
            else:
                loss, out = _train_step(model, head, x, y, optimizer, grad_clip, accumulate)
            if log is not None:  # .item() syncs a GPU, so only when someone listens
                if world == 1:
                    accuracy = (out.argmax(dim=1) == y).float().mean()
                lr_now = optimizer.param_groups[0]["lr"]
                log(step, {"loss": loss.item(), "accuracy": accuracy.item(), "lr": lr_now})
            done = step + 1
            due = checkpoint_every > 0 and done % checkpoint_every == 0 and done < steps
            if checkpoint is not None and due and rank == 0:  # no checkpoint after the last step
                loops._save_resume(checkpoint, fingerprint, done, model, optimizer)
    finally:
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    if checkpoint is not None and rank == 0:
        checkpoint.unlink(missing_ok=True)
    return image_encoder_state(model)
