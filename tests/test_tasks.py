"""mergeloom.tasks: the one task type, tensor splits, their file format, subsets and labels."""

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from mergeloom import data, loops, tasks, vectors
from mergeloom.tasks import Relabeled, Task, TensorImages


def images(n, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def digits():
    return data.multitask_tasks(["noisy"], splits=data.digit_splits(), seed=1)[0]


def test_tensor_images_items_and_validation():
    x, y = images(4), torch.tensor([3, 1, 0, 2])
    ds = TensorImages(x, y)
    assert len(ds) == 4 and ds.images is x and ds.labels is y
    image, label = ds[1]
    assert torch.equal(image, x[1]) and label == 1 and type(label) is int
    bad = [
        ((x[0], y), r"float32 of shape \(N, 3, S, S\), got torch.float32 \(3, 8, 8\)"),
        ((x.double(), y), "got torch.float64"),
        ((torch.rand(4, 1, 8, 8), y), r"\(4, 1, 8, 8\)"),
        ((torch.rand(4, 3, 8, 6), y), r"\(4, 3, 8, 6\)"),
        ((x, y.int()), r"labels must be int64 of shape \(4,\).*got torch.int32"),
        ((x, y[:3]), r"shape \(4,\) to match the images, got torch.int64 \(3,\)"),
        ((x.numpy(), y), "needs tensors, got images ndarray"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            TensorImages(*args)


def test_save_and_load_task_round_trip(digits, tmp_path):
    path = tmp_path / "sub" / "noisy.safetensors"
    tasks.save_task(digits, path)
    loaded = tasks.load_task(path)
    assert isinstance(loaded, Task)
    assert (loaded.name, loaded.classnames, loaded.templates) == (
        digits.name,
        digits.classnames,
        digits.templates,
    )
    for split in tasks.SPLITS:
        a, b = getattr(digits, split), getattr(loaded, split)
        assert isinstance(b, TensorImages)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert b.images.dtype == torch.float32 and b.labels.dtype == torch.int64
    tasks.save_task(loaded, tmp_path / "again.safetensors")  # same tensors, same bytes
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_save_task_refuses_other_datasets_and_load_names_what_is_missing(digits, tmp_path):
    other = Task("x", ("a",), ("{}",), digits.train, Subset(digits.val, [0]), digits.test)
    with pytest.raises(ValueError, match="needs TensorImages splits; x/val is a Subset"):
        tasks.save_task(other, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    vectors.save({"train_images": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="is not a saved task: it lacks \\['train_labels'"):
        tasks.load_task(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not found"):
        tasks.load_task(tmp_path / "missing.safetensors")


def test_labels_of_reads_tensor_images_and_views_without_images():
    y = torch.tensor([3, 1, 0, 2, 1])
    ds = TensorImages(images(5), y)
    assert tasks.labels_of(ds) is y
    assert tasks.labels_of(Subset(ds, [4, 0])).tolist() == [1, 3]
    relabeled = Relabeled(Subset(ds, [0, 1, 4]), [2, 0], torch.tensor([9, 8, 7, 6]))
    assert tasks.labels_of(relabeled).tolist() == [8, 6]
    assert [relabeled[i][1] for i in range(2)] == [8, 6]
    assert torch.equal(relabeled[0][0], ds.images[4])
    plain = TensorDataset(torch.zeros(3, 1), torch.tensor([2, 0, 1]))  # no label attribute
    assert tasks.labels_of(plain).tolist() == [2, 0, 1]


def test_class_subset_of_a_tensor_task(digits):
    sub = tasks.class_subset(digits, [7, 2], "split")
    assert sub.classnames == ("two", "seven") and sub.templates == digits.templates
    keep = torch.isin(digits.test.labels, torch.tensor([2, 7]))
    assert tasks.labels_of(sub.test).tolist() == (digits.test.labels[keep] == 7).long().tolist()
    assert torch.equal(sub.test[0][0], digits.test.images[keep][0])
    view = loops.tensor_view(sub.test)
    assert view[0] is digits.test.images and torch.equal(view[1], keep.nonzero().flatten())
    assert loops.tensor_view(TensorDataset(torch.zeros(2, 3, 8, 8), torch.zeros(2))) is None
    with pytest.raises(ValueError, match=r"distinct indices in 0..9, got \[2, 2\]"):
        tasks.class_subset(digits, [2, 2], "bad")


def test_leave_one_out():
    assert tasks.leave_one_out(["a", "b", "c"]) == {"a": ["b", "c"], "b": ["a", "c"],
                                                    "c": ["a", "b"]}  # fmt: skip
    with pytest.raises(ValueError, match=r"at least 2 domains, got \['a'\]"):
        tasks.leave_one_out(["a"])
