"""mergeloom.data: real sklearn digits turned into multi-task, continual and domain tasks."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from mergeloom import data
from mergeloom.tasks import Task, TensorImages

ORDER = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def splits():
    return data.digit_splits()


@pytest.fixture(scope="module")
def multitask(splits):
    return {t.name: t for t in data.multitask_tasks(list(data.MULTITASK), splits=splits, seed=0)}


@pytest.fixture(scope="module")
def digits_at_8(splits):
    """Plain digits at their native 8x8 size: upsampling to 8 must be the identity."""
    return data.multitask_tasks(["digits"], image_size=8, splits=splits)[0]


def _parts(task):
    return [getattr(task, s) for s in SPLITS]


# ---- splits ------------------------------------------------------------------------------------


def test_splits_disjoint_sorted_cover_everything(splits):
    sets = [set(splits[s]) for s in SPLITS]
    assert sum(len(s) for s in sets) == 1797 == len(set.union(*sets))
    assert all(splits[s] == sorted(splits[s]) for s in SPLITS)
    assert (len(splits["val"]), len(splits["test"])) == (180, 540)  # 10 % and 30 % of 1797


def test_splits_are_stratified(splits):
    labels = torch.from_numpy(load_digits().target)
    per_class = torch.bincount(labels, minlength=10).float()
    for name, fraction in (("train", 0.6), ("val", 0.1), ("test", 0.3)):
        counts = torch.bincount(labels[splits[name]], minlength=10).float()
        assert (counts - fraction * per_class).abs().max() <= 2, name


def test_splits_follow_fractions_and_seed():
    custom = data.digit_splits(val_fraction=0.2, test_fraction=0.25, seed=3)
    assert abs(len(custom["val"]) - 0.2 * 1797) <= 1
    assert abs(len(custom["test"]) - 0.25 * 1797) <= 1
    assert custom == data.digit_splits(val_fraction=0.2, test_fraction=0.25, seed=3)
    assert custom["test"] != data.digit_splits(val_fraction=0.2, test_fraction=0.25)["test"]


# ---- shapes, ranges, real data -----------------------------------------------------------------


def test_every_task_has_valid_shapes_dtypes_and_labels(splits, multitask):
    tasks = [*multitask.values(), *data.domain_tasks(list(data.DOMAINS), splits=splits)]
    for task in tasks:
        assert all("{}" in t for t in task.templates) and 1 <= len(task.templates) <= 3
        for split_name, part in zip(SPLITS, _parts(task), strict=True):
            n = len(splits[split_name])
            assert part.images.shape == (n, 3, 16, 16) and part.images.dtype == torch.float32
            assert part.labels.shape == (n,) and part.labels.dtype == torch.int64
            assert part.images.min() >= 0 and part.images.max() <= 1
            assert torch.equal(part.images[:, 0], part.images[:, 1])  # grayscale in 3 channels
            assert torch.equal(part.images[:, 0], part.images[:, 2])
            assert part.labels.min() >= 0 and part.labels.max() < len(task.classnames)
        assert set(task.train.labels.tolist()) == set(range(len(task.classnames))), task.name


def test_builders_return_tasks_of_tensor_images(splits, multitask):
    built = [
        *multitask.values(),
        *data.continual_tasks(ORDER, 2, splits=splits),
        data.full_test(splits=splits),
        *data.domain_tasks(["plain", "noisy"], splits=splits),
    ]
    for task in built:
        assert isinstance(task, Task)
        assert all(isinstance(part, TensorImages) for part in _parts(task))
        image, label = task.test[0]
        assert torch.equal(image, task.test.images[0]) and label == int(task.test.labels[0])
        assert isinstance(label, int)


def test_tensors_are_the_digits_bit_for_bit(splits, multitask):
    """The images are sklearn's digits / 16, upsampled bilinearly, then transformed: computed
    here independently, bit-identical to the builders' tensors."""
    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images.astype("float32") / 16.0)
    targets = torch.from_numpy(bunch.target.astype("int64"))
    for split in SPLITS:
        idx = torch.tensor(splits[split])
        plain = F.interpolate(pixels[idx].unsqueeze(1), size=(16, 16), mode="bilinear")
        plain = plain.expand(-1, 3, -1, -1)
        checks = {
            "digits": (plain, targets[idx]),
            "rotated": (torch.rot90(plain, 1, dims=(-2, -1)), targets[idx]),
            "inverted": (1.0 - plain, targets[idx]),
            "mirrored": (plain.flip(-1), targets[idx]),
            "parity": (plain, targets[idx] % 2),
            "magnitude": (plain, (targets[idx] >= 5).long()),
        }
        for name, (images, labels) in checks.items():
            part = getattr(multitask[name], split)
            assert torch.equal(part.images, images), (name, split)
            assert torch.equal(part.labels, labels), (name, split)
    split0 = data.continual_tasks(ORDER, 5, splits=splits)[0]  # classes 1 and 3 -> 0 and 1
    keep = torch.isin(targets[splits["test"]], torch.tensor([1, 3]))
    assert torch.equal(split0.test.images, multitask["digits"].test.images[keep])
    assert torch.equal(split0.test.labels, (targets[splits["test"]][keep] == 3).long())


@pytest.mark.parametrize("size", [8, 13, 24])
def test_image_size(splits, size):
    task = data.domain_tasks(["blurred"], image_size=size, splits=splits)[0]
    assert task.test.images.shape == (540, 3, size, size)


def test_images_are_the_sklearn_digits(splits, digits_at_8):
    source = load_digits()
    for split_name, part in zip(SPLITS, _parts(digits_at_8), strict=True):
        index = splits[split_name]
        expected = torch.from_numpy(source.images[index]).float() / 16
        assert torch.equal(part.images[:, 0], expected)
        assert torch.equal(part.labels, torch.from_numpy(source.target[index]).long())
    assert digits_at_8.classnames == tuple(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )


def test_same_seed_gives_bit_identical_tasks(splits, multitask):
    again = data.multitask_tasks(list(data.MULTITASK), splits=splits, seed=0)
    for task in again:
        for a, b in zip(_parts(task), _parts(multitask[task.name]), strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


# ---- transforms ------------------------------------------------------------------------------


def test_geometric_and_photometric_transforms(multitask):
    plain = multitask["digits"]
    for split in SPLITS:
        x = getattr(plain, split).images
        assert torch.equal(getattr(multitask["rotated"], split).images, torch.rot90(x, 1, (-2, -1)))
        assert torch.equal(getattr(multitask["inverted"], split).images, 1 - x)
        assert torch.equal(getattr(multitask["mirrored"], split).images, torch.flip(x, (-1,)))
        for name in ("rotated", "inverted", "mirrored", "noisy", "blurred"):
            assert torch.equal(getattr(multitask[name], split).labels, getattr(plain, split).labels)
    assert not torch.equal(torch.rot90(plain.test.images, 1, (-2, -1)), plain.test.images)


def test_parity_and_magnitude_labels(multitask):
    digits = multitask["digits"]
    assert multitask["parity"].classnames == ("even", "odd")
    assert multitask["magnitude"].classnames == ("small", "large")
    for split in SPLITS:
        y = getattr(digits, split).labels
        assert torch.equal(getattr(multitask["parity"], split).labels, y % 2)
        assert torch.equal(getattr(multitask["magnitude"], split).labels, (y >= 5).long())
        assert torch.equal(
            getattr(multitask["parity"], split).images, getattr(digits, split).images
        )


def test_noise_is_seeded_per_image(splits, multitask):
    plain, noisy = multitask["digits"].test.images, multitask["noisy"].test.images
    delta = noisy - plain
    inside = (plain > 0.3) & (plain < 0.7) & (noisy > 0) & (noisy < 1)  # not clipped
    assert abs(delta[inside].std().item() - data.NOISE_STD) < 0.03
    other = data.multitask_tasks(["noisy"], splits=splits, seed=1)[0].test.images
    assert not torch.equal(other, noisy)
    # the noise of an image depends on its dataset index only: same in another task and subset
    assert torch.equal(data.domain_tasks(["noisy"], splits=splits)[0].test.images, noisy)
    subset = {s: splits["test"][::7] for s in SPLITS}
    alone = data.multitask_tasks(["noisy"], splits=subset)[0].test.images
    assert torch.equal(alone, noisy[::7])


def test_blur_smooths_and_preserves_constants(multitask):
    plain, blurred = multitask["digits"].test.images, multitask["blurred"].test.images

    def variation(x):
        return (x.diff(dim=-1).abs().sum() + x.diff(dim=-2).abs().sum()).item()

    assert variation(blurred) < 0.8 * variation(plain)
    assert abs(blurred.mean().item() - plain.mean().item()) < 0.01  # mass is kept
    blur = data.MULTITASK["blurred"].transform
    constant = torch.full((2, 1, 16, 16), 0.4)
    assert torch.allclose(blur(constant, torch.arange(2), 0), constant)
    impulse = torch.zeros(1, 1, 16, 16)
    impulse[..., 8, 8] = 1
    spread = blur(impulse, torch.arange(1), 0)[0, 0]
    assert abs(spread.sum().item() - 1) < 1e-5 and spread[8, 8] < 0.5
    assert torch.allclose(spread, spread.T) and torch.allclose(spread[8, 7], spread[8, 9])


# ---- domains -----------------------------------------------------------------------------------


def test_domains_share_generic_templates(splits, multitask):
    tasks = data.domain_tasks(list(data.DOMAINS), splits=splits)
    assert [t.name for t in tasks] == ["plain", "rotated", "inverted", "noisy", "blurred"]
    assert {t.templates for t in tasks} == {data.GENERIC_TEMPLATES}
    assert all(t.classnames == data.DIGIT_NAMES for t in tasks)
    for task in tasks:
        twin = multitask["digits" if task.name == "plain" else task.name]
        assert torch.equal(task.val.images, twin.val.images)
        assert all(w not in " ".join(task.templates) for w in ("rotat", "invert", "nois", "blur"))


# ---- continual ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tasks", [1, 3, 10])
def test_continual_tasks_partition_and_remap(splits, n_tasks):
    full = data.full_test(splits=splits)
    tasks = data.continual_tasks(ORDER, n_tasks, splits=splits)
    assert [t.name for t in tasks] == [f"split{t}" for t in range(n_tasks)]
    seen = []
    for t, task in enumerate(tasks):
        classes = sorted(ORDER[10 * t // n_tasks : 10 * (t + 1) // n_tasks])
        assert task.classnames == tuple(data.DIGIT_NAMES[c] for c in classes)
        seen += classes
        for split in SPLITS:
            mine, everything = getattr(task, split), getattr(full, split)
            keep = torch.isin(everything.labels, torch.tensor(classes))
            assert torch.equal(mine.images, everything.images[keep])
            original = [data.DIGIT_NAMES[c] for c in everything.labels[keep].tolist()]
            assert [task.classnames[i] for i in mine.labels.tolist()] == original
            assert set(mine.labels.tolist()) == set(range(len(classes)))
    assert sorted(seen) == list(range(10))  # union is all classes, no overlap


def test_continual_chunks_follow_the_order(splits):
    tasks = data.continual_tasks(ORDER, 3, splits=splits)
    assert [t.classnames for t in tasks] == [
        ("one", "three", "four"),
        ("zero", "five", "nine"),
        ("two", "six", "seven", "eight"),
    ]


def test_full_test_is_all_ten_digits(splits, multitask):
    full = data.full_test(splits=splits)
    assert full.name == "all_digits" and full.classnames == data.DIGIT_NAMES
    for a, b in zip(_parts(full), _parts(multitask["digits"]), strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


# ---- pretraining -------------------------------------------------------------------------------


def test_pretraining_uses_train_only(splits, multitask):
    images, captions = data.pretraining_pairs(splits=splits)
    assert torch.equal(images, multitask["digits"].train.images)
    assert len(captions) == len(splits["train"])
    only_train = {"train": splits["test"][:50]}  # val/test never needed, so never read
    images, captions = data.pretraining_pairs(splits=only_train)
    assert torch.equal(images, multitask["digits"].test.images[:50]) and len(captions) == 50


def test_pretraining_captions_name_the_digit(splits, multitask):
    _, captions = data.pretraining_pairs(splits=splits, seed=0)
    labels = multitask["digits"].train.labels.tolist()
    extras = {"even": 0, "odd": 0, "small": 0, "large": 0}
    for caption, y in zip(captions, labels, strict=True):
        assert data.DIGIT_NAMES[y] in caption.split(",")[0].split()
        for word, correct in (("even", y % 2 == 0), ("odd", y % 2), ("small", y < 5)):
            if f" {word} number" in caption:
                assert correct, caption
                extras[word] += 1
        if " large number" in caption:
            assert y >= 5, caption
            extras["large"] += 1
    assert min(extras.values()) > 50  # every attribute word is seen
    plain = sum("," not in c for c in captions)
    assert plain > len(captions) / 5 and len({c.split(",")[0].split()[0] for c in captions}) >= 3
    assert captions == data.pretraining_pairs(splits=splits, seed=0)[1]
    assert captions != data.pretraining_pairs(splits=splits, seed=1)[1]


# ---- errors ------------------------------------------------------------------------------------


def test_unknown_and_duplicate_names(splits):
    with pytest.raises(ValueError, match=r"unknown task name\(s\) \['svhn'\].*known: digits, "):
        data.multitask_tasks(["digits", "svhn"], splits=splits)
    with pytest.raises(ValueError, match=r"unknown domain.*'mirrored'.*known: plain, rotated"):
        data.domain_tasks(["mirrored"], splits=splits)  # mirrored is a task, not a domain
    with pytest.raises(ValueError, match="distinct"):
        data.domain_tasks(["plain", "plain"], splits=splits)


@pytest.mark.parametrize(
    "order", [ORDER[:9], ORDER[:9] + [3], [*ORDER[:9], 10], [1.5, *ORDER[1:]], ["a"] * 10]
)
def test_bad_class_order(splits, order):
    with pytest.raises(ValueError, match=r"class_order must be a permutation of 0\.\.9, got"):
        data.continual_tasks(order, 2, splits=splits)


@pytest.mark.parametrize("n_tasks", [0, 11, -1, 2.5, True])
def test_bad_n_tasks(splits, n_tasks):
    with pytest.raises(ValueError, match=rf"n_tasks must be an int in 1\.\.10.*got {n_tasks!r}"):
        data.continual_tasks(ORDER, n_tasks, splits=splits)


@pytest.mark.parametrize("size", [7, 0, 16.0, True])
def test_bad_image_size(splits, size):
    for build in (
        lambda: data.multitask_tasks(["digits"], image_size=size, splits=splits),
        lambda: data.continual_tasks(ORDER, 2, image_size=size, splits=splits),
        lambda: data.domain_tasks(["plain"], image_size=size, splits=splits),
        lambda: data.full_test(image_size=size, splits=splits),
        lambda: data.pretraining_pairs(image_size=size, splits=splits),
    ):
        with pytest.raises(ValueError, match=rf"image_size must be an int >= 8.*got {size!r}"):
            build()


@pytest.mark.parametrize(
    ("val", "test", "message"),
    [
        (0.0, 0.3, "val_fraction must be in the open interval"),
        (0.1, 1.0, "test_fraction must be in the open interval"),
        (-0.1, 0.3, "val_fraction"),
        (True, 0.3, "val_fraction"),
        (0.5, 0.5, r"val_fraction \+ test_fraction must be < 1.*got 0.5 \+ 0.5"),
        (0.4, 0.7, "must be < 1"),
    ],
)
def test_bad_fractions(val, test, message):
    with pytest.raises(ValueError, match=message):
        data.digit_splits(val_fraction=val, test_fraction=test)


def test_bad_splits_mapping(splits):
    with pytest.raises(ValueError, match="splits lacks 'val'"):
        data.multitask_tasks(["digits"], splits={"train": [0], "test": [1]})
    with pytest.raises(ValueError, match=r"splits\['test'\] has indices outside 0\.\.1796"):
        data.full_test(splits={**splits, "test": [0, 1797]})
