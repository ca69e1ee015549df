"""The paper's benchmark datasets as tasks read from disk: torchvision classes, ImageFolder trees.

``load_task(name, root)`` builds a ``mergeloom.tasks.Task``: class names, prompt templates and
three splits (``train``, ``val``, ``test``) as map-style datasets of ``(PIL image, label)``;
transforms are applied by ``mergeloom.train.finetune`` and ``mergeloom.evaluate``, so the same
splits serve the train and val transforms. Nothing is downloaded unless ``download=True``
(torchvision's own download); a missing dataset fails at once with its name, the path looked at,
the layout expected and how to fetch it.

Splits follow docs/methods.md#validation: ``test`` is the official test split; ``val`` is a seeded
held-out fraction of the official train split (10 %, at most 5000 images, drawn as
``torch.utils.data.random_split`` with generator seed 0 draws it, as Task Arithmetic's registry
does) and ``train`` is the rest, so validation never touches test (§7 trap 21). Datasets without
an official test split in torchvision (EuroSAT 10 %, SUN397 50 %, RESISC45 20 %, ImageFolder
domains 20 %) get a seeded test holdout first (``Source.holdout_test``). These are not the
published split files of Task Arithmetic (SUN397 partition 1, torchgeo's RESISC45 lists, the
EuroSAT split of TA's data preparation), so their accuracies are comparable with each other,
not image for image with published numbers (recompute denominators:
docs/methods.md#normalized-accuracy).

Continual (§4.2): ``cifar100_class_splits(n)`` cuts MagMax's fixed CIFAR-100 class order into n
class-incremental tasks; ``class_subset`` keeps a task's classes and remaps labels to the sorted
subset. Domain generalisation (§4.3): ``domain_tasks(root)`` reads ``root/<domain>/<class>/*``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import Dataset, Subset

from mergeloom import prompts

# re-exported: the continual and domain helpers live with the task type, in mergeloom.tasks
from mergeloom.tasks import Relabeled, Task, class_subset, labels_of, leave_one_out  # noqa: F401

# MagMax's CIFAR-100 class order (``default_class_order`` in danielm1405/magmax
# src/datasets/cifar100.py, also in docs/methods.md#continual); split t of n takes
# order[100t/n : 100(t+1)/n] (MagMax floors 100/n*t, equal for n dividing 100), sorted.
MAGMAX_CIFAR100_ORDER = (
    70, 89, 11, 13, 63, 53, 86, 57, 41, 43, 14, 98, 52, 73, 95, 96, 33, 16, 39, 74, 25, 88, 35, 28,
    79, 82, 72, 4, 30, 17, 59, 97, 36, 38, 29, 55, 83, 7, 22, 48, 19, 47, 2, 44, 67, 71, 34, 84, 6,
    46, 61, 8, 80, 10, 49, 15, 68, 9, 99, 40, 27, 45, 51, 37, 21, 64, 92, 24, 60, 31, 5, 91, 93, 90,
    65, 66, 77, 20, 58, 62, 23, 76, 75, 42, 0, 26, 87, 50, 3, 56, 81, 1, 94, 69, 18, 78, 54, 12, 85,
    32,
)  # fmt: skip
CIFAR100_SPLITS = (5, 10, 20, 50)  # the N of MagMax's class-incremental runs
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


Build = Callable[[Path, str, bool], Dataset]  # (root, "train" | "test", download) -> dataset


@dataclass(frozen=True)
class Source:
    """How to read one benchmark dataset: the torchvision class call, names, layout, fetching."""

    build: Build
    layout: str  # expected layout under root, for the error message
    classnames: Callable[[Dataset], Sequence[str]] = lambda ds: ds.classes
    epochs: int = 1  # fine-tuning epochs of the protocol (docs/methods.md#validation)
    holdout_test: float = 0.0  # > 0: no official test split, hold out this seeded fraction


def _split_kw(cls: type, arg: str = "split", train: object = "train", test: object = "test"):
    """A Build calling ``cls(root, <arg>=train|test, download=...)``."""
    return lambda root, split, download: cls(
        str(root), **{arg: train if split == "train" else test}, download=download
    )


def _whole(cls: type) -> Build:
    """A Build for a dataset without splits: the same whole dataset for train and test."""
    return lambda root, split, download: cls(str(root), download=download)


def _resisc45(root: Path, split: str, download: bool) -> Dataset:
    if download:
        raise FileNotFoundError("torchvision has no RESISC45 downloader")
    return tvd.ImageFolder(str(root / "resisc45" / "NWPU-RESISC45"))


class _Transposed(Dataset):
    """EMNIST's files store every image transposed; this serves them upright (the rotate by -90
    degrees plus horizontal flip that CLIP merging code bases apply is this transpose)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.targets = dataset, dataset.targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image.transpose(Image.Transpose.TRANSPOSE), label


def _emnist(root: Path, split: str, download: bool) -> Dataset:
    return _Transposed(
        tvd.EMNIST(str(root), split="digits", train=split == "train", download=download)
    )


def _fer2013(root: Path, split: str, download: bool) -> Dataset:
    if download:
        raise FileNotFoundError("torchvision has no FER2013 downloader")
    return tvd.FER2013(str(root), split=split)


SOURCES: dict[str, Source] = {
    "Cars": Source(_split_kw(tvd.StanfordCars), "root/stanford_cars/{devkit,cars_train,cars_test,"
                   "cars_test_annos_withlabels.mat}", epochs=35),
    "DTD": Source(_split_kw(tvd.DTD), "root/dtd/dtd/{images,labels}", epochs=76),
    "EuroSAT": Source(_whole(tvd.EuroSAT), "root/eurosat/2750/<class>/*.jpg",
                      lambda ds: [prompts.EUROSAT.get(c, c) for c in ds.classes], epochs=12,
                      holdout_test=0.1),
    "GTSRB": Source(_split_kw(tvd.GTSRB), "root/gtsrb/{GTSRB/Training,GTSRB/Final_Test,"
                    "GT-final_test.csv}", lambda ds: prompts.GTSRB, epochs=11),
    "MNIST": Source(_split_kw(tvd.MNIST, "train", True, False),
                    "root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
                    lambda ds: prompts.DIGITS, epochs=5),
    "RESISC45": Source(_resisc45, "root/resisc45/NWPU-RESISC45/<class>/*.jpg (ImageFolder)",
                       lambda ds: [c.replace("_", " ") for c in ds.classes], epochs=15,
                       holdout_test=0.2),
    "SUN397": Source(_whole(tvd.SUN397), "root/SUN397/{ClassName.txt,<letter>/<class>/*.jpg}",
                     epochs=14, holdout_test=0.5),
    "SVHN": Source(_split_kw(tvd.SVHN), "root/{train,test}_32x32.mat",
                   lambda ds: prompts.DIGITS, epochs=4),
    "CIFAR10": Source(_split_kw(tvd.CIFAR10, "train", True, False),
                      "root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
                      epochs=6),
    "CIFAR100": Source(_split_kw(tvd.CIFAR100, "train", True, False),
                       "root/cifar-100-python/{train,test,meta}", epochs=6),
    "STL10": Source(_split_kw(tvd.STL10), "root/stl10_binary/*.bin", epochs=60),
    "Flowers102": Source(_split_kw(tvd.Flowers102), "root/flowers-102/{jpg,imagelabels.mat,"
                         "setid.mat}", lambda ds: prompts.FLOWERS102, epochs=147),
    "OxfordIIITPet": Source(_split_kw(tvd.OxfordIIITPet, "split", "trainval", "test"),
                            "root/oxford-iiit-pet/{images,annotations}", epochs=82),
    "PCAM": Source(_split_kw(tvd.PCAM), "root/pcam/camelyonpatch_level_2_split_*.h5 (needs h5py)",
                   lambda ds: prompts.PCAM, epochs=1),
    "FER2013": Source(_fer2013, "root/fer2013/{train,test}.csv",
                      lambda ds: prompts.FER2013, epochs=10),
    "Food101": Source(_split_kw(tvd.Food101), "root/food-101/{images,meta}",
                      lambda ds: [c.replace("_", " ") for c in ds.classes], epochs=4),
    "FashionMNIST": Source(_split_kw(tvd.FashionMNIST, "train", True, False),
                           "root/FashionMNIST/raw/*-ubyte", epochs=5),
    "RenderedSST2": Source(_split_kw(tvd.RenderedSST2), "root/rendered-sst2/{train,test}/"
                           "{negative,positive}/*.png", epochs=39),
    "EMNIST": Source(_emnist, "root/EMNIST/raw/emnist-digits-*-ubyte (the 'digits' split)",
        lambda ds: prompts.DIGITS, epochs=2),
    "KMNIST": Source(_split_kw(tvd.KMNIST, "train", True, False), "root/KMNIST/raw/*-ubyte",
                     epochs=5),
}  # fmt: skip
TASKS_8 = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")
TASKS_14 = (*TASKS_8, "CIFAR100", "STL10", "Flowers102", "OxfordIIITPet", "PCAM", "FER2013")
TASKS_20 = (*TASKS_14, "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST")


_MANUAL = {  # datasets torchvision cannot download
    "Cars": "get the Stanford Cars files (the upstream URL is gone; e.g. the Kaggle mirror) and "
    "unpack them there",
    "RESISC45": "download NWPU-RESISC45 (e.g. with torchgeo's RESISC45(root, download=True)) and "
    "unpack it so that each class is one folder there",
    "FER2013": "download fer2013 from Kaggle (challenges-in-representation-learning-facial-"
    "expression-recognition-challenge) and put its CSV files there",
}


def _fetch_hint(name: str) -> str:
    if name in _MANUAL:
        return _MANUAL[name]
    return (
        f"run torchvision.datasets.{name}(root, download=True) on a machine with internet "
        "(or load_task(..., download=True) there) and copy root here"
    )


def _missing(name: str, root: Path, err: Exception) -> ValueError:
    return ValueError(
        f"dataset {name} not found under {root}: expected {SOURCES[name].layout}; to fetch it, "
        f"{_fetch_hint(name)}. ({type(err).__name__}: {err})"
    )


def _build(name: str, root: Path, split: str, download: bool) -> Dataset:
    try:
        return SOURCES[name].build(root, split, download)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise _missing(name, root, err) from err


def train_val_indices(
    n: int, *, fraction: float = 0.1, max_size: int = 5000, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(train, val) indices of an n-image train split, exactly as
    ``random_split(ds, [n - v, v], generator=torch.Generator().manual_seed(seed))`` with
    ``v = min(int(n * fraction), max_size)`` (Task Arithmetic's ``split_train_into_train_val``).

    Raises:
        ValueError: fraction outside (0, 1), max_size < 1, or nothing left to train on.
    """
    if not 0 < fraction < 1 or max_size < 1:
        raise ValueError(
            f"val fraction must be in (0, 1) and max_size >= 1, got {fraction}, {max_size}"
        )
    size = min(int(n * fraction), max_size)
    if size < 1 or size >= n:
        raise ValueError(
            f"a {fraction} val split of {n} images leaves {size} val images; "
            "need at least one val and one train image"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[: n - size], perm[n - size :]


def _holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(rest, held out) for datasets without a test split; sorted, seeded by ``seed + 1``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    size = max(1, round(n * fraction))
    return sorted(perm[size:].tolist()), sorted(perm[:size].tolist())


def _task(
    name: str,
    classnames: Sequence[str],
    templates: Sequence[str],
    train_full: Dataset,
    test: Dataset,
    *,
    val_fraction: float,
    val_max: int,
    seed: int,
) -> Task:
    train_idx, val_idx = train_val_indices(
        len(train_full), fraction=val_fraction, max_size=val_max, seed=seed
    )
    return Task(
        name,
        tuple(classnames),
        tuple(templates),
        Subset(train_full, train_idx),
        Subset(train_full, val_idx),
        test,
    )


def load_task(
    name: str,
    root: str | Path,
    *,
    download: bool = False,
    val_fraction: float = 0.1,
    val_max: int = 5000,
    seed: int = 0,
) -> Task:
    """One benchmark dataset of ``SOURCES`` as a task, read from ``root``.

    Raises:
        ValueError: Unknown name (the known ones are listed), or the dataset is not on disk
            (naming the path, the expected layout and how to fetch it).
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)}")
    root = Path(root)
    if not root.is_dir() and not download:
        raise _missing(name, root, FileNotFoundError(f"{root} is not a directory"))
    source = SOURCES[name]
    full = _build(name, root, "train", download)
    classnames = list(source.classnames(full))
    if source.holdout_test:
        rest, held = _holdout(len(full), source.holdout_test, seed)
        train_full, test = Subset(full, rest), Subset(full, held)
    else:
        train_full, test = full, _build(name, root, "test", download)
    return _task(
        name,
        classnames,
        prompts.TEMPLATES[name],
        train_full,
        test,
        val_fraction=val_fraction,
        val_max=val_max,
        seed=seed,
    )


# ------------------------------------------------------- continual (docs/methods.md#continual)


def cifar100_class_splits(
    n_tasks: int, order: Sequence[int] = MAGMAX_CIFAR100_ORDER
) -> list[list[int]]:
    """MagMax's class-incremental CIFAR-100 tasks: task t holds order[100t/n : 100(t+1)/n], sorted.

    Raises:
        ValueError: n_tasks not in CIFAR100_SPLITS, or ``order`` not a permutation of 0..99.
    """
    if n_tasks not in CIFAR100_SPLITS:
        raise ValueError(f"CIFAR-100 is split into {list(CIFAR100_SPLITS)} tasks, got {n_tasks!r}")
    if sorted(order) != list(range(100)):
        raise ValueError("class order must be a permutation of 0..99")
    return [sorted(order[100 * t // n_tasks : 100 * (t + 1) // n_tasks]) for t in range(n_tasks)]


# ---------------------------------------------------------------- domains (docs/methods.md#domains)


@functools.cache
def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def domain_tasks(
    root: str | Path,
    domains: Sequence[str] | None = None,
    *,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    val_max: int = 5000,
    seed: int = 0,
) -> list[Task]:
    """One task per domain folder of ``root/<domain>/<class>/*`` (DomainNet, PACS, OfficeHome).

    Every domain must have the same class folders (one shared head). Test is a seeded
    ``test_fraction`` holdout of each domain (DomainBed's 20 %), val is drawn from the rest.

    Raises:
        ValueError: root missing, unknown domains, fewer than 2 domains, or class lists differ.
    """
    root = Path(root)
    layout = "root/<domain>/<class>/<image>.png|jpg (DomainNet / PACS / OfficeHome layout)"
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not found:
        raise ValueError(f"no domain folders under {root}: expected {layout}")
    domains = list(domains or found)
    unknown = [d for d in domains if d not in found]
    if unknown or len(domains) < 2:
        raise ValueError(f"domains {domains} invalid: need 2+ of the folders {found} in {root}")
    folders = {d: tvd.ImageFolder(str(root / d), is_valid_file=_is_image) for d in domains}
    first = folders[domains[0]].classes
    for domain, full in folders.items():
        if full.classes != first:
            raise ValueError(
                f"domain {domain} has {len(full.classes)} classes {full.classes[:5]}..., domain "
                f"{domains[0]} has {len(first)} {first[:5]}...: all domains need the same "
                "class folders"
            )
    tasks = []
    for domain, full in folders.items():
        rest, held = _holdout(len(full), test_fraction, seed)
        names = [c.replace("_", " ") for c in full.classes]
        tasks.append(
            _task(
                domain,
                names,
                prompts.TEMPLATES["domains"],
                Subset(full, rest),
                Subset(full, held),
                val_fraction=val_fraction,
                val_max=val_max,
                seed=seed,
            )
        )
    return tasks
