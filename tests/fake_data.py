"""Small files in the real on-disk formats of the benchmark datasets, written from scratch.

Images are seeded noise around a class colour, so a tiny model can learn them and a test can
check that a loader returns exactly the pixels that were written.
"""

import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import torchvision.datasets as tvd
import yaml
from PIL import Image

COLOURS = np.array(
    [[220, 30, 30], [30, 200, 30], [30, 30, 220], [200, 200, 40], [40, 200, 200], [200, 40, 200]]
)


def images(n: int, labels: np.ndarray, size: int, seed: int, channels: int = 3) -> np.ndarray:
    """(n, size, size, channels) uint8: class colour (cycled) plus noise."""
    rng = np.random.default_rng(seed)
    base = COLOURS[labels % len(COLOURS)][:, None, None, :channels]
    noise = rng.integers(-25, 26, size=(n, size, size, channels))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar(root: Path, classes: int, n_train: int, n_test: int, seed: int = 0) -> dict:
    """CIFAR-10 (classes=10) or CIFAR-100 (classes=100) python pickle batches under root.

    Returns the written arrays: {"train": (HWC images, labels), "test": (...)}.
    torchvision checks md5 sums of the real files; tests patch those to None (existence only).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, classes, size=n)
        out[split] = (images(n, labels, 32, seed + len(split)), labels)
    chw = {s: a.transpose(0, 3, 1, 2).reshape(len(a), -1) for s, (a, _) in out.items()}
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        parts = np.array_split(np.arange(n_train), 5)
        for i, idx in enumerate(parts, start=1):
            _pickle(
                folder / f"data_batch_{i}",
                {"data": chw["train"][idx], "labels": out["train"][1][idx].tolist()},
            )
        _pickle(folder / "test_batch", {"data": chw["test"], "labels": out["test"][1].tolist()})
        _pickle(folder / "batches.meta", {"label_names": [f"thing{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            _pickle(
                folder / split,
                {
                    "data": chw[split],
                    "fine_labels": out[split][1].tolist(),
                    "coarse_labels": (out[split][1] // 5).tolist(),
                },
            )
        _pickle(
            folder / "meta",
            {
                "fine_label_names": [f"class_{i}" for i in range(100)],
                "coarse_label_names": [f"super{i}" for i in range(20)],
            },
        )
    return out


def no_cifar_checksums(monkeypatch) -> None:
    """Make torchvision's CIFAR classes check that the files exist instead of their md5 sums."""
    for cls in (tvd.CIFAR10, tvd.CIFAR100):
        monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


def _idx(path: Path, array: np.ndarray) -> None:
    """IDX file (LeCun's MNIST format): magic 0x08 (uint8) + ndim, big-endian dims, data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, n_train: int, n_test: int, seed: int = 0) -> dict:
    """MNIST-family raw idx files under root/<folder>/raw (MNIST, FashionMNIST, KMNIST; EMNIST's
    'digits' split when folder is "EMNIST")."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    prefixes = (
        ("emnist-digits-train", "emnist-digits-test") if folder == "EMNIST" else ("train", "t10k")
    )
    for prefix, split, n in ((prefixes[0], "train", n_train), (prefixes[1], "test", n_test)):
        labels = rng.integers(0, 10, size=n)
        pixels = images(n, labels, 28, seed + n, channels=1)[..., 0]
        _idx(raw / f"{prefix}-images-idx3-ubyte", pixels)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[split] = (pixels, labels)
    return out


def write_image_folder(
    folder: Path,
    classes: list[str],
    per_class: int,
    seed: int = 0,
    size: int = 20,
    ext: str = "png",
) -> None:
    """folder/<class>/<i>.<ext>: an ImageFolder tree of real image files."""
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        pixels = images(per_class, np.full(per_class, c), size, seed + 7 * c)
        for i, array in enumerate(pixels):
            Image.fromarray(array).save(folder / name / f"{i:04d}.{ext}")


def small_stage_folder(folder: Path, pretrain_steps: int = 10) -> Path:
    """A folder where the stage scripts run as the pipeline runs them: the tiny model config and
    tests/fixtures/params_small.yaml with a short pretraining."""
    root = Path(__file__).resolve().parents[1]
    (folder / "configs").mkdir()
    shutil.copy(root / "configs" / "tiny-vit.json", folder / "configs")
    params = yaml.safe_load((root / "tests" / "fixtures" / "params_small.yaml").read_text())
    params["pretrain"]["steps"] = pretrain_steps
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder
