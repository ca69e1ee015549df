"""The embedded default's data: real 8x8 digit scans from scikit-learn, turned into tasks.

``sklearn.datasets.load_digits`` ships 1797 grayscale handwritten digits (values 0..16, ink is
high) inside the wheel, so the whole pipeline can run on real images with no download. From one
stratified train/val/test split of those images this module builds the tasks of the three
evaluation setups of docs/methods.md (#multitask, #continual, #domains):

* multi-task (4.1): eight tasks that differ by image transform or by label space (MULTITASK);
* continual class-incremental (4.2): contiguous chunks of a class order, labels remapped per
  chunk, plus the 10-way ``all_digits`` task for the task-agnostic evaluation (full_test);
* domain generalisation (4.3): the same 10-class task under each transform in DOMAINS, all with
  the same generic templates so that a held-out domain's head knows nothing about its domain.

Every builder returns ``mergeloom.tasks.Task`` with ``TensorImages`` splits, the same task type
the on-disk benchmarks use, so fine-tuning and evaluation have one path for both.

Images are upsampled bilinearly to ``image_size`` first and every transform acts on the
upsampled (N, 1, S, S) image, so rotation and flips are exact permutations of the plain pixels.
Everything is a pure function of its arguments: the same seed gives bit-identical tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mergeloom.tasks import Task, TensorImages

# (images (N, 1, S, S) in [0, 1], dataset indices (N,), seed) -> images of the same shape
Transform = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
Splits = Mapping[str, Sequence[int]]

N_IMAGES = 1797
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GENERIC_TEMPLATES = ("a photo of the digit {}.", "an image of the number {}.")
NOISE_STD = 0.2  # additive Gaussian noise, in units of the [0, 1] pixel range
BLUR_SIGMA = 0.75  # Gaussian blur, in pixels of the original 8x8 image
_SEED_STRIDE = 1_000_003  # > N_IMAGES, so (seed, index) -> per-image seed never collides


@dataclass(frozen=True)
class TaskSpec:
    """How to build one multi-task task from the plain digits."""

    transform: Transform
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    relabel: Callable[[torch.Tensor], torch.Tensor] = lambda labels: labels  # digit -> task label


def _identity(images: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    return images


def _rotate(images: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.rot90(images, 1, dims=(-2, -1))  # 90 degrees counter-clockwise


def _invert(images: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    return 1.0 - images  # dark ink on a light background


def _mirror(images: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.flip(images, dims=(-1,))  # left-right


def _add_noise(images: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Noise drawn from (seed, dataset index) alone, so an image is equally noisy in every task,
    split and subset that contains it."""
    noise = torch.empty_like(images)
    for row, index in enumerate(indices.tolist()):
        gen = torch.Generator().manual_seed(seed * _SEED_STRIDE + index)
        noise[row] = torch.randn(images.shape[1:], generator=gen)
    return (images + NOISE_STD * noise).clamp(0.0, 1.0)


def _blur(images: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Separable Gaussian blur; sigma scales with image_size so the blur is the same at any S.

    Replicate padding and a normalised kernel keep a constant image constant and values in [0, 1].
    """
    sigma = BLUR_SIGMA * images.shape[-1] / 8
    radius = math.ceil(2 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, -1, 1))
    return F.conv2d(out, kernel.view(1, 1, 1, -1)).clamp(0.0, 1.0)


DOMAINS: dict[str, Transform] = {
    "plain": _identity,
    "rotated": _rotate,
    "inverted": _invert,
    "noisy": _add_noise,
    "blurred": _blur,
}


def _on_digits(transform: Transform, *templates: str) -> TaskSpec:
    return TaskSpec(transform, DIGIT_NAMES, templates)


MULTITASK: dict[str, TaskSpec] = {
    "digits": _on_digits(_identity, *GENERIC_TEMPLATES),
    "rotated": _on_digits(_rotate, "a rotated photo of the digit {}.", "a sideways digit {}."),
    "inverted": _on_digits(
        _invert, "an inverted photo of the digit {}.", "a dark digit {} on white."
    ),
    "mirrored": _on_digits(_mirror, "a mirrored photo of the digit {}.", "a flipped digit {}."),
    "noisy": _on_digits(_add_noise, "a noisy photo of the digit {}.", "a grainy digit {}."),
    "blurred": _on_digits(_blur, "a blurry photo of the digit {}.", "a blurred digit {}."),
    "parity": TaskSpec(
        _identity,
        ("even", "odd"),
        ("a photo of an {} digit.", "a digit that is an {} number."),
        relabel=lambda labels: labels % 2,
    ),
    "magnitude": TaskSpec(
        _identity,
        ("small", "large"),
        ("a photo of a {} digit.", "a digit that is a {} number."),
        relabel=lambda labels: (labels >= 5).long(),
    ),
}


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images (N, 8, 8) scaled to [0, 1] and labels (N,); read once, never mutated."""
    from sklearn.datasets import load_digits  # here: importing sklearn costs every stage ~1 s

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    return images, torch.from_numpy(bunch.target.astype(np.int64))


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not 0 < value < 1:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")


def digit_splits(
    *, val_fraction: float = 0.1, test_fraction: float = 0.3, seed: int = 0
) -> dict[str, list[int]]:
    """Stratified split of the 1797 digit indices into sorted "train"/"val"/"test" lists.

    Fractions are of the whole data set. Test is drawn first, then val from the rest, both
    stratified by digit, so every class keeps its share in every split.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave training data, "
            f"got {val_fraction} + {test_fraction}"
        )
    from sklearn.model_selection import train_test_split

    labels = _digits()[1].numpy()
    rest, test = train_test_split(
        np.arange(N_IMAGES), test_size=test_fraction, stratify=labels, random_state=seed
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1 - test_fraction),
        stratify=labels[rest],
        random_state=seed,
    )
    return {
        "train": sorted(train.tolist()),
        "val": sorted(val.tolist()),
        "test": sorted(test.tolist()),
    }


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the digits are 8x8), got {image_size!r}")


def _split_indices(splits: Splits, split: str) -> torch.Tensor:
    if split not in splits:
        raise ValueError(
            f"splits lacks {split!r}; it needs 'train', 'val' and 'test', got {sorted(splits)}"
        )
    indices = torch.as_tensor(list(splits[split]), dtype=torch.int64)
    if indices.numel() and not (indices.min() >= 0 and indices.max() < N_IMAGES):
        raise ValueError(f"splits[{split!r}] has indices outside 0..{N_IMAGES - 1}")
    return indices


def _images(
    indices: torch.Tensor, image_size: int, transform: Transform, seed: int
) -> torch.Tensor:
    """Upsample, transform, then repeat to 3 channels: (N, 3, S, S) float32 in [0, 1]."""
    small = _digits()[0][indices].unsqueeze(1)  # (N, 1, 8, 8)
    big = F.interpolate(small, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return transform(big, indices, seed).expand(-1, 3, -1, -1).contiguous()


Select = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _everything(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones_like(labels, dtype=torch.bool), labels


def _relabel_all(relabel: Callable, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _everything(relabel(labels))


def _task(
    name: str,
    classnames: Sequence[str],
    templates: Sequence[str],
    splits: Splits,
    image_size: int,
    transform: Transform = _identity,
    seed: int = 0,
    select: Select = _everything,
) -> Task:
    """Build a Task; ``select(digit labels) -> (keep mask, task labels)`` picks and relabels."""
    parts = {}
    for split in ("train", "val", "test"):
        indices = _split_indices(splits, split)
        keep, labels = select(_digits()[1][indices])
        images = _images(indices[keep], image_size, transform, seed)
        parts[split] = TensorImages(images, labels[keep])
    return Task(name, tuple(classnames), tuple(templates), **parts)


def _check_names(kind: str, names: Sequence[str], known: Mapping[str, object]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {kind} name(s) {unknown}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{kind} names must be distinct, got {list(names)}")


def multitask_tasks(
    names: Sequence[str], *, image_size: int = 16, splits: Splits, seed: int = 0
) -> list[Task]:
    """The named MULTITASK tasks, in the order given; ``seed`` only drives the noise."""
    _check_names("task", names, MULTITASK)
    _check_image_size(image_size)
    tasks = []
    for name in names:
        spec = MULTITASK[name]
        select = functools.partial(_relabel_all, spec.relabel)
        tasks.append(
            _task(
                name,
                spec.classnames,
                spec.templates,
                splits,
                image_size,
                spec.transform,
                seed,
                select,
            )
        )
    return tasks


def continual_tasks(
    class_order: Sequence[int], n_tasks: int, *, image_size: int = 16, splits: Splits, seed: int = 0
) -> list[Task]:
    """Class-incremental tasks ``split{t}`` as in MagMax, on plain digits.

    Protocol: docs/methods.md#continual.

    Task t holds the classes class_order[10t/n : 10(t+1)/n] (floored, then sorted); each split
    keeps only those classes, with labels remapped to 0..|C_t|-1 in sorted class order, so
    each task's head is a subset head. The task-agnostic 10-way evaluation uses full_test.
    ``seed`` is accepted for a uniform signature; plain digits need no randomness.
    """
    try:
        order = [int(c) for c in class_order]
    except (TypeError, ValueError):
        order = []
    if sorted(order) != list(range(10)) or order != list(class_order):
        raise ValueError(f"class_order must be a permutation of 0..9, got {list(class_order)}")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or not 1 <= n_tasks <= 10:
        raise ValueError(
            f"n_tasks must be an int in 1..10 (non-empty chunks of 10), got {n_tasks!r}"
        )
    _check_image_size(image_size)
    tasks = []
    for t in range(n_tasks):
        classes = torch.tensor(sorted(order[10 * t // n_tasks : 10 * (t + 1) // n_tasks]))
        tasks.append(
            _task(
                f"split{t}",
                [DIGIT_NAMES[c] for c in classes],
                GENERIC_TEMPLATES,
                splits,
                image_size,
                select=lambda y, c=classes: (torch.isin(y, c), torch.searchsorted(c, y)),
            )
        )
    return tasks


def full_test(*, image_size: int = 16, splits: Splits) -> Task:
    """``all_digits``: plain 10-way digits over every split, for task-agnostic evaluation."""
    _check_image_size(image_size)
    return _task("all_digits", DIGIT_NAMES, GENERIC_TEMPLATES, splits, image_size)


def domain_tasks(
    domains: Sequence[str], *, image_size: int = 16, splits: Splits, seed: int = 0
) -> list[Task]:
    """The 10-class digit task under each named domain transform, all with GENERIC_TEMPLATES."""
    _check_names("domain", domains, DOMAINS)
    _check_image_size(image_size)
    return [
        _task(d, DIGIT_NAMES, GENERIC_TEMPLATES, splits, image_size, DOMAINS[d], seed)
        for d in domains
    ]


_CAPTIONS = (
    "a photo of the digit {}",
    "a handwritten {}",
    "the number {}",
    "an image of the digit {}",
)


def pretraining_pairs(
    *, image_size: int = 16, splits: Splits, seed: int = 0
) -> tuple[torch.Tensor, list[str]]:
    """Plain TRAIN images (N, 3, S, S) and one seeded caption each, for pretraining a tiny CLIP.

    Val and test images never appear, so zero-shot and merged evaluations stay clean. A third of
    the captions add the parity and a third the magnitude word, so the text tower has seen the
    class names of the parity and magnitude tasks.
    """
    _check_image_size(image_size)
    indices = _split_indices(splits, "train")
    digits = _digits()[1][indices].tolist()
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randint(len(_CAPTIONS), (len(digits),), generator=gen).tolist()
    extras = torch.randint(3, (len(digits),), generator=gen).tolist()
    captions = []
    for digit, template, extra in zip(digits, templates, extras, strict=True):
        caption = _CAPTIONS[template].format(DIGIT_NAMES[digit])
        if extra == 1:
            caption += f", an {('even', 'odd')[digit % 2]} number"
        elif extra == 2:
            caption += f", a {('small', 'large')[digit >= 5]} number"
        captions.append(caption)
    return _images(indices, image_size, _identity, seed), captions
