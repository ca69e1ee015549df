"""Real dataset loaders on small files written in each real on-disk format (no downloads).

CIFAR pickle batches, MNIST-family idx files and ImageFolder PNG/JPEG trees go through the
torchvision classes (tests only relax torchvision's md5 check of the CIFAR files), then one
fine-tuning step and an evaluation run on them with the tiny config.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import no_cifar_checksums, write_cifar, write_image_folder, write_mnist
from torch.utils.data import random_split

from mergeloom import datasets as D
from mergeloom import evaluate, loops, tasks, train
from mergeloom.clip import image_encoder_state, load_clip, zeroshot_head

CONFIG = Path(__file__).parents[1] / "configs" / "tiny-vit.json"
RESISC = ["airport", "baseball_diamond", "beach"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    written = {
        "CIFAR10": write_cifar(root, 10, n_train=120, n_test=40, seed=1),
        "CIFAR100": write_cifar(root, 100, n_train=400, n_test=200, seed=2),
        "MNIST": write_mnist(root, "MNIST", n_train=60, n_test=20, seed=3),
        "KMNIST": write_mnist(root, "KMNIST", n_train=30, n_test=10, seed=4),
        "FashionMNIST": write_mnist(root, "FashionMNIST", n_train=30, n_test=10, seed=5),
        "EMNIST": write_mnist(root, "EMNIST", n_train=30, n_test=10, seed=8),
    }
    write_image_folder(root / "resisc45" / "NWPU-RESISC45", RESISC, per_class=12, seed=6)
    write_image_folder(root / "eurosat" / "2750", ["Forest", "SeaLake"], 10, seed=7, ext="jpg")
    for d, domain in enumerate(["clipart", "real", "sketch"]):
        write_image_folder(root / "domains" / domain, ["cat", "hot_dog"], 8, seed=10 + d)
    return root, written


@pytest.fixture(autouse=True)
def _cifar_md5(monkeypatch):
    no_cifar_checksums(monkeypatch)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(str(CONFIG))


@pytest.mark.parametrize("name", ["CIFAR10", "CIFAR100", "MNIST", "KMNIST", "FashionMNIST"])
def test_torchvision_loaders_return_the_written_pixels_and_splits(root, name):
    root, written = root
    task = D.load_task(name, root)
    assert isinstance(task, tasks.Task)
    (train_x, train_y), (test_x, test_y) = written[name]["train"], written[name]["test"]
    n = len(train_y)
    assert len(task.classnames) == (100 if name == "CIFAR100" else 10)
    assert (len(task.train), len(task.val), len(task.test)) == (n - n // 10, n // 10, len(test_y))
    train_idx, val_idx = task.train.indices, task.val.indices
    assert sorted(train_idx + val_idx) == list(range(n))  # val is held out of train, not test
    for k in (0, 1):
        image, label = task.val[k]  # val item k is train-split image val_idx[k]
        assert label == train_y[val_idx[k]]
        assert np.array_equal(np.asarray(image), train_x[val_idx[k]])
        image, label = task.test[k]
        assert label == test_y[k] and np.array_equal(np.asarray(image), test_x[k])
    assert torch.equal(tasks.labels_of(task.train), torch.as_tensor(train_y[train_idx]))


def test_emnist_images_come_upright_from_its_transposed_files(root):
    root, written = root
    task = D.load_task("EMNIST", root)
    image, label = task.test[3]
    pixels, labels = written["EMNIST"]["test"]
    assert label == labels[3] and np.array_equal(np.asarray(image), pixels[3].T)
    assert task.classnames == tuple("0123456789") and len(task.val) == 3


def test_dataset_provided_names_are_kept(root):
    root, _ = root
    assert D.load_task("CIFAR100", root).classnames[:2] == ("class_0", "class_1")  # underscores
    assert D.load_task("MNIST", root).classnames == tuple("0123456789")
    assert D.load_task("KMNIST", root).classnames[:3] == ("o", "ki", "su")


def test_val_split_is_task_arithmetics_random_split():
    for n in (50, 1234, 80_000):  # 80 000 * 10 % > 5000: capped
        train, val = D.train_val_indices(n)
        size = min(n // 10, 5000)
        ref = random_split(range(n), [n - size, size], generator=torch.Generator().manual_seed(0))
        assert (train, val) == (list(ref[0].indices), list(ref[1].indices))
    assert D.train_val_indices(100, seed=1) != D.train_val_indices(100, seed=0)
    with pytest.raises(ValueError, match="leaves 0 val images"):
        D.train_val_indices(5)


def test_image_folder_datasets_hold_out_a_seeded_test_split(root):
    root, _ = root
    task = D.load_task("RESISC45", root)
    assert task.classnames == ("airport", "baseball diamond", "beach")
    assert len(task.test) == round(36 * 0.2)
    test = set(task.test.indices)
    assert not test & set(task.train.dataset.indices)  # train and val come from the rest
    assert D.load_task("RESISC45", root).test.indices == task.test.indices  # seeded
    image, label = task.test[0]
    assert image.size == (20, 20) and 0 <= label < 3
    assert D.load_task("EuroSAT", root).classnames == ("forest", "sea or lake")


@pytest.mark.parametrize("name", list(D.SOURCES))
def test_missing_dataset_names_it_the_path_the_layout_and_how_to_fetch(tmp_path, name):
    with pytest.raises(ValueError) as err:
        D.load_task(name, tmp_path)
    message = str(err.value)
    assert f"dataset {name} not found under {tmp_path}" in message
    assert D.SOURCES[name].layout in message and "to fetch it" in message


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'SUN398'; known: Cars, DTD"):
        D.load_task("SUN398", tmp_path)


@pytest.mark.parametrize("n", D.CIFAR100_SPLITS)
def test_cifar100_splits_follow_magmax_order(n):
    splits = D.cifar100_class_splits(n)
    assert len(splits) == n and all(len(s) == 100 // n for s in splits)
    assert sorted(c for s in splits for c in s) == list(range(100))
    assert splits[0] == sorted(D.MAGMAX_CIFAR100_ORDER[: 100 // n])
    assert all(s == sorted(s) for s in splits)


def test_magmax_order_is_the_published_one():
    assert D.MAGMAX_CIFAR100_ORDER[:8] == (70, 89, 11, 13, 63, 53, 86, 57)
    assert D.MAGMAX_CIFAR100_ORDER[-3:] == (12, 85, 32)
    assert sorted(D.MAGMAX_CIFAR100_ORDER) == list(range(100))
    with pytest.raises(ValueError, match=r"\[5, 10, 20, 50\] tasks, got 7"):
        D.cifar100_class_splits(7)


def test_class_subset_keeps_remaps_and_names_the_split_classes(root):
    root, written = root
    task = D.load_task("CIFAR100", root)
    classes = D.cifar100_class_splits(10)[3]
    sub = tasks.class_subset(task, classes, "split3")
    assert sub.classnames == tuple(f"class_{c}" for c in classes)
    test_y = written["CIFAR100"]["test"][1]
    expected = [classes.index(y) for y in test_y if y in classes]
    assert tasks.labels_of(sub.test).tolist() == expected
    assert [sub.test[i][1] for i in range(len(sub.test))] == expected
    assert len(sub.train) + len(sub.val) == int(
        np.isin(written["CIFAR100"]["train"][1], classes).sum()
    )
    with pytest.raises(ValueError, match="distinct indices in 0..99"):
        tasks.class_subset(task, [3, 100], "bad")


def test_domains_share_classes_and_leave_one_out(root, tmp_path):
    root, _ = root
    domains = D.domain_tasks(root / "domains")
    assert all(isinstance(t, tasks.Task) for t in domains)
    assert [t.name for t in domains] == ["clipart", "real", "sketch"]
    assert all(t.classnames == ("cat", "hot dog") for t in domains)
    assert all(len(t.test) == round(16 * 0.2) for t in domains)
    assert tasks.leave_one_out([t.name for t in domains])["real"] == ["clipart", "sketch"]
    assert D.leave_one_out is tasks.leave_one_out and D.class_subset is tasks.class_subset
    write_image_folder(tmp_path / "a", ["cat", "dog"], 2)
    write_image_folder(tmp_path / "b", ["cat", "cow"], 2)
    with pytest.raises(ValueError, match="same class folders"):
        D.domain_tasks(tmp_path)
    with pytest.raises(ValueError, match="need 2\\+ of the folders"):
        D.domain_tasks(tmp_path, ["a", "z"])
    with pytest.raises(ValueError, match="no domain folders under .*expected root/<domain>/"):
        D.domain_tasks(tmp_path / "nothing")


@pytest.mark.parametrize("name", ["CIFAR10", "MNIST", "RESISC45"])
def test_one_finetuning_step_and_evaluation_on_each_format(root, tiny, name):
    root, _ = root
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    task = D.load_task(name, root)
    head = zeroshot_head(model, tokenizer, task.classnames, task.templates)
    train_tf, val_tf = loops.transforms(model)
    before = {"visual": image_encoder_state(model), "text": model.token_embedding.weight.clone()}
    state = train.finetune(
        model,
        head,
        task.train,
        transform=train_tf,
        steps=1,
        batch_size=16,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=0,
        seed=0,
        device="cpu",
        num_classes=len(task.classnames),
    )
    assert state.keys() == before["visual"].keys()
    assert any(not torch.equal(state[k], before["visual"][k]) for k in state)
    assert torch.equal(model.token_embedding.weight, before["text"])  # text tower frozen
    feats = evaluate.features(model, task.test, transform=val_tf, batch_size=7, device="cpu")
    assert feats.shape == (len(task.test), 32)
    preds = (feats @ head).argmax(dim=1)
    labels = tasks.labels_of(task.test)
    assert preds.min() >= 0 and preds.max() < len(task.classnames)
    acc = evaluate.accuracy(
        model,
        head,
        task.test,
        num_classes=len(task.classnames),
        transform=val_tf,
        batch_size=7,
        device="cpu",
    )
    assert acc == (preds == labels).float().mean().item()


def test_class_count_mismatch_names_both_numbers(root, tiny):
    root, _ = root
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    task = D.load_task("CIFAR10", root)
    head = zeroshot_head(model, tokenizer, task.classnames[:4], task.templates)
    train_tf, val_tf = loops.transforms(model)
    with pytest.raises(ValueError, match="the head has 4 classes .*the data has 10"):
        evaluate.accuracy(
            model,
            head,
            task.test,
            num_classes=10,
            transform=val_tf,
            batch_size=8,
            device="cpu",
        )
    with pytest.raises(ValueError, match="the head has 4 classes .*the data has 10"):
        train.finetune(
            model,
            head,
            task.train,
            transform=train_tf,
            steps=1,
            batch_size=4,
            lr=1e-3,
            weight_decay=0.0,
            warmup_steps=0,
            seed=0,
            device="cpu",
            num_classes=10,
        )
    with pytest.raises(ValueError, match="a label .* in the data, but the head has 4 classes"):
        train.finetune(
            model,
            head,
            task.train,
            transform=train_tf,
            steps=3,
            batch_size=64,
            lr=1e-3,
            weight_decay=0.0,
            warmup_steps=0,
            seed=0,
            device="cpu",
        )
