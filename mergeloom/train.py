"""Training loops: contrastive pretraining of a CLIP, and fine-tuning of its image tower.

``finetune`` follows the Task Arithmetic recipe (algorithms.md §4.1): AdamW, linear warm-up then
cosine decay to 0, gradient-norm clipping at 1.0, frozen zero-shot head, only ``model.visual``
trains. Both loops take tensors, not loaders: batches are drawn by index with a seeded
generator, so a run is reproducible bit for bit on the CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mergeloom.clip import StateDict, Tokenizer, image_encoder_state, logits, normalize_images

logger = logging.getLogger(__name__)
Log = Callable[[int, dict[str, float]], None]


def cosine_schedule(step: int, *, total: int, warmup: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine to 0.

    Warm-up rises as ``(step + 1) / warmup``, as in Task Arithmetic's ``cosine_lr``. A warm-up
    longer than training is kept as the reference code has it: the rate never leaves warm-up and
    peaks at ``total / warmup`` (algorithms.md §7 trap 17); ``finetune`` logs a warning then.

    Raises:
        ValueError: ``total < 1`` or ``warmup < 0``.
    """
    if total < 1 or warmup < 0:
        raise ValueError(f"cosine_schedule needs total >= 1 and warmup >= 0, got {total}, {warmup}")
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)  # clamped past the end
    return 0.5 * (1.0 + math.cos(math.pi * progress))


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
    for step, idx in enumerate(tqdm(batches, total=steps, desc=desc, disable=None)):
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


def finetune(
    model: open_clip.CLIP,
    head: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    seed: int,
    device: str | torch.device,
    log: Log | None = None,
    grad_clip: float | None = 1.0,
) -> StateDict:
    """Fine-tune the image tower with cross-entropy through a frozen zero-shot head, in place.

    Everything but ``model.visual`` is frozen for the run (the text tower, and hence the head,
    must stay the pretrained ones so that task vectors live in the image tower only); the
    ``requires_grad`` flags are restored afterwards.

    Args:
        head: (embed_dim, C) zero-shot head from ``clip.zeroshot_head``.
        images: (N, 3, S, S) in [0, 1].
        labels: N class indices in [0, C).
        log: Called as ``log(step, {"loss", "accuracy", "lr"})``; accuracy is the batch's.
        grad_clip: Maximum gradient norm, None for no clipping.

    Returns:
        The fine-tuned ``image_encoder_state(model)``.

    Raises:
        ValueError: Bad hyperparameters, image/label counts, or labels outside the head.
    """
    _check(steps, batch_size, lr, warmup_steps, len(images), len(labels))
    if labels.ndim != 1 or labels.is_floating_point() or labels.min() < 0:
        raise ValueError(f"labels must be a 1-D integer tensor >= 0, got {labels.dtype} {labels}")
    if labels.max() >= head.shape[-1]:
        raise ValueError(
            f"labels go up to {int(labels.max())} but the head has {head.shape[-1]} classes"
        )
    device = torch.device(device)
    torch.manual_seed(seed)
    head = head.detach().to(device)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))

    try:
        model.to(device).train()
        optimizer = _adamw(list(model.visual.parameters()), lr, weight_decay, device)
        batches = _batches(len(images), batch_size, steps, seed)
        for step, idx in _scheduled(
            optimizer, batches, steps=steps, warmup_steps=warmup_steps, desc="finetune"
        ):
            y = labels[idx.to(labels.device)].to(device)
            out = logits(model, head, images[idx.to(images.device)].to(device))  # (B, C)
            loss = F.cross_entropy(out, y)
            _update(optimizer, loss, grad_clip)
            if log is not None:
                accuracy = (out.argmax(dim=1) == y).float().mean().item()
                lr_now = optimizer.param_groups[0]["lr"]
                log(step, {"loss": loss.item(), "accuracy": accuracy, "lr": lr_now})
    finally:
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    return image_encoder_state(model)
