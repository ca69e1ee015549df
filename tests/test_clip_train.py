"""open_clip glue, the fine-tuning loop, transforms and evaluation on the tiny config in configs/
(CPU, offline): real open_clip models, no mocks."""

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip import get_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import Dataset, Subset

from mergeloom.clip import (
    full_state,
    image_encoder_state,
    load_clip,
    load_full_state,
    load_image_encoder,
    logits,
    normalize_images,
    zeroshot_head,
)
from mergeloom.device import pick_device
from mergeloom.evaluate import accuracy, features, score
from mergeloom.loops import transforms as clip_transforms
from mergeloom.protocol import EvalSet
from mergeloom.tasks import Relabeled, TensorImages
from mergeloom.train import cosine_schedule, finetune, pretrain

CONFIG = Path(__file__).parents[1] / "configs" / "tiny-vit.json"
CLASSES = ["red", "green", "blue", "gray"]
TEMPLATES = ["a photo of {}.", "a {} thing."]
FT = dict(batch_size=16, lr=1e-3, weight_decay=0.1, warmup_steps=2, seed=0, device="cpu")
EVAL = dict(batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return load_clip(str(CONFIG))


@pytest.fixture
def model(built):
    return copy.deepcopy(built[0])


@pytest.fixture(scope="module")
def tokenizer(built):
    return built[1]


@pytest.fixture(scope="module")
def head(built):
    return zeroshot_head(*built, CLASSES, TEMPLATES)


@pytest.fixture(scope="module")
def data():
    """64 images whose class is their dominant colour, so a tiny model can fit them."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(64) % 4
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]])[labels]
    noise = torch.rand(64, 3, 16, 16, generator=g)
    return TensorImages((0.6 * colours[:, :, None, None] + 0.4 * noise).clamp(0, 1), labels)


@pytest.fixture(scope="module")
def transforms(built):
    return clip_transforms(built[0])


def test_load_clip_from_config_path(model, tokenizer):
    assert not model.training
    assert tuple(model.visual.image_size) == (16, 16)
    assert tokenizer(["a photo of red."]).shape == (1, 16)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match="close matches: ViT-B-32"):
        load_clip("ViT-B-23")
    with pytest.raises(ValueError, match="not found"):
        load_clip("no/such/config.json")


def test_zeroshot_head_shape_and_column_norms(model, tokenizer, head):
    assert head.shape == (32, 4)
    scale = model.logit_scale.exp().item()
    torch.testing.assert_close(head.norm(dim=0), torch.full((4,), scale))
    swapped = zeroshot_head(model, tokenizer, CLASSES[::-1], TEMPLATES)
    torch.testing.assert_close(swapped, head.flip(1))  # columns follow the class order
    with pytest.raises(ValueError, match="0 templates"):
        zeroshot_head(model, tokenizer, CLASSES, [])


def test_logits_normalize_then_project(model, head, data):
    images = data.images[:5]
    out = logits(model, head, images)
    assert out.shape == (5, 4)
    features = model.encode_image(normalize_images(model, images))
    expected = features / features.norm(dim=1, keepdim=True) @ head
    torch.testing.assert_close(out, expected)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    assert normalize_images(model, mean.expand(2, 3, 16, 16)).abs().max() < 1e-6
    assert normalize_images(model, torch.rand(2, 3, 32, 32)).shape == (2, 3, 16, 16)


def test_image_encoder_state_round_trip(model):
    state = image_encoder_state(model)
    assert "conv1.weight" in state and not any(k.startswith("visual.") for k in state)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.visual.parameters():
            p.add_(1.0)
    load_image_encoder(other, state)
    for key, value in image_encoder_state(other).items():
        assert torch.equal(value, state[key]), key
    state["conv1.weight"].add_(1.0)  # a clone: editing it leaves the model alone
    assert not torch.equal(model.visual.conv1.weight, state["conv1.weight"])


def test_load_image_encoder_is_strict_and_names_keys(model):
    state = image_encoder_state(model)
    del state["proj"]
    with pytest.raises(ValueError, match="missing keys \\['proj'\\]"):
        load_image_encoder(model, state)
    state = image_encoder_state(model) | {"bogus": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected keys \\['bogus'\\]"):
        load_image_encoder(model, state)
    state = image_encoder_state(model) | {"proj": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="'proj' has shape \\(3, 3\\)"):
        load_image_encoder(model, state)


def test_full_state_round_trip(model):
    state = full_state(model)
    assert "token_embedding.weight" in state and "visual.conv1.weight" in state
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.token_embedding.weight.zero_()
    load_full_state(other, state)
    assert torch.equal(other.token_embedding.weight, model.token_embedding.weight)
    with pytest.raises(ValueError, match="visual.proj"):
        load_full_state(other, {k: v for k, v in state.items() if k != "visual.proj"})


def test_finetune_trains_only_the_image_tower_and_fits(model, head, data, transforms):
    before = full_state(model)
    history = []
    kw = FT | dict(batch_size=64, warmup_steps=5)
    state = finetune(
        model,
        head,
        data,
        transform=transforms[0],
        steps=40,
        log=lambda s, d: history.append(d),
        **kw,
    )
    after = full_state(model)
    text = [k for k in before if not k.startswith("visual.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    assert all(torch.equal(v, after[f"visual.{k}"]) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert len(history) == 40 and set(history[0]) == {"loss", "accuracy", "lr"}
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]
    assert accuracy(model, head, data, **EVAL | dict(transform=transforms[1])) >= 0.95


class Items(Dataset):
    """The items of a dataset with its tensor hidden, so that the DataLoader path runs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


def test_finetune_is_deterministic_and_independent_of_workers(built, head, data, transforms):
    def run(dataset, seed=0, workers=0):
        kw = FT | dict(
            seed=seed, batch_size=24, num_workers=workers
        )  # short last batch: 64 = 24+24+16
        model = copy.deepcopy(built[0])
        return finetune(model, head, dataset, transform=transforms[0], steps=4, **kw)

    runs = [run(data), run(data), run(data, seed=1), run(Items(data)), run(Items(data), workers=2)]
    for other in (runs[1], runs[3], runs[4]):  # sliced or item by item, in 0 or 2 workers
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])
    assert not torch.equal(runs[0]["proj"], runs[2]["proj"])  # the seed picks the batches


def test_finetune_rejects_bad_input(model, head, data, transforms):
    ft = FT | dict(transform=transforms[0])
    ten = TensorImages(data.images[:10], torch.arange(10))
    with pytest.raises(ValueError, match="a label [2-9] in the data, but the head has 2 classes"):
        finetune(model, head[:, :2], ten, steps=1, **ft)
    with pytest.raises(ValueError, match="the head has 2 classes .*the data has 4"):
        finetune(model, head[:, :2], data, steps=1, num_classes=4, **ft)
    for bad in (dict(steps=0), dict(steps=1, batch_size=0), dict(steps=1, lr=0.0)):
        with pytest.raises(ValueError, match="need steps >= 1"):
            finetune(model, head, data, **ft | bad)
    with pytest.raises(ValueError, match="got 0 images"):
        finetune(model, head, TensorImages(data.images[:0], data.labels[:0]), steps=1, **ft)
    small = TensorImages(torch.rand(4, 3, 8, 8), torch.arange(4))
    with pytest.raises(
        ValueError, match=r"tensor images are \(8, 8\) but the model takes \(16, 16\)"
    ):
        finetune(model, head, small, steps=1, **ft)


def test_long_warmup_still_trains_and_warns(model, head, data, transforms, caplog):
    history = []
    with caplog.at_level(logging.WARNING, logger="mergeloom.train"):
        finetune(
            model,
            head,
            data,
            transform=transforms[0],
            steps=2,
            log=lambda s, d: history.append(d),
            **FT | dict(warmup_steps=8),
        )
    assert "longer than training" in caplog.text
    assert [h["lr"] for h in history] == pytest.approx([1e-3 / 8, 2e-3 / 8])


def test_pretrain_lowers_the_contrastive_loss(model, tokenizer, data):
    images, labels = data.images, data.labels
    captions = [f"a photo of {CLASSES[i]}." for i in labels]
    before = full_state(model)
    history = []
    log = lambda s, d: history.append(d["loss"])  # noqa: E731
    pretrain(model, tokenizer, images, captions, steps=12, log=log, **FT)
    after = full_state(model)
    assert sum(history[-3:]) < 0.8 * sum(history[:3])
    for key in ("visual.conv1.weight", "token_embedding.weight", "text_projection"):
        assert not torch.equal(before[key], after[key]), key
    assert model.logit_scale.item() <= math.log(100) and not model.training
    with pytest.raises(ValueError, match="64 images, 3"):
        pretrain(model, tokenizer, images, captions[:3], steps=1, **FT)


def test_cosine_schedule():
    values = [cosine_schedule(s, total=100, warmup=10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == values[10] == 1.0
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[-1] < 1e-3 and values[55] == pytest.approx(0.5)
    assert cosine_schedule(0, total=5, warmup=0) == 1.0
    assert cosine_schedule(4, total=5, warmup=50) == pytest.approx(0.1)  # trap 17: stays in warm-up
    with pytest.raises(ValueError, match="total >= 1"):
        cosine_schedule(0, total=0, warmup=0)


def test_accuracy_equals_manual_computation(model, head, data, transforms):
    val_tf = transforms[1]
    with torch.no_grad():
        expected = logits(model, head, data.images)
    feats = features(model, data, transform=val_tf, batch_size=7, device="cpu")
    assert feats.dtype == torch.float32 and feats.shape == (64, 32)
    torch.testing.assert_close(feats @ head, expected)
    manual = (expected.argmax(dim=1) == data.labels).float().mean().item()
    acc = accuracy(model, head, data, **EVAL | dict(transform=val_tf, batch_size=7))
    assert 0.0 <= acc <= 1.0 and acc == pytest.approx(manual)
    wrong = TensorImages(data.images, (expected.argmax(dim=1) + 1) % 4)
    assert accuracy(model, head, wrong, **EVAL | dict(transform=val_tf)) == 0.0
    with pytest.raises(ValueError, match="the head has 4 classes .*the data has 3"):
        accuracy(model, head, data, num_classes=3, **EVAL | dict(transform=val_tf))
    with pytest.raises(ValueError, match="got 0 images"):
        accuracy(model, head, Subset(data, []), **EVAL | dict(transform=val_tf))


def test_sliced_evaluation_equals_the_dataloader_path(model, data, transforms):
    """TensorImages (and Subset / Relabeled views of it) are batched by slicing the tensor;
    the features are bit-identical to a DataLoader over the same items."""
    mapping = torch.tensor([1, 0, -1, -1])
    views = [
        data,
        Subset(data, [5, 3, 60, 0, 9]),
        Relabeled(Subset(data, range(40)), range(30), mapping),
    ]
    for transform in (transforms[1], lambda x: x * 2):  # batched ImageTransform or item by item
        for view in views:
            kw = dict(transform=transform, batch_size=6, device="cpu")
            fast = features(model, view, **kw)
            slow = features(model, Items(view), **kw)
            assert torch.equal(fast, slow) and len(fast) == len(view)
        workers = features(
            model, Items(data), num_workers=2, transform=transform, batch_size=6, device="cpu"
        )
        assert torch.equal(
            features(model, data, transform=transform, batch_size=6, device="cpu"), workers
        )


def test_score_reuses_features_and_matches_accuracy(model, head, data, transforms):
    """score == accuracy per set and split, also for sets that are views of another set."""
    kw = EVAL | dict(transform=transforms[1], batch_size=10)
    other = TensorImages(data.images.flip(0).contiguous(), data.labels.flip(0).contiguous())
    part = Subset(data, [i for i in range(64) if data.labels[i] in (0, 2)])
    sets = [
        EvalSet("all", head, data, other),
        EvalSet("part", head, part, Subset(other, range(7))),
        EvalSet("items", head[:, :3], Items(Subset(data, range(30))), data),
    ]
    visual = image_encoder_state(model)
    encoded = []
    hook = model.visual.register_forward_hook(lambda m, args, out: encoded.append(len(args[0])))
    scores = score(model, visual, sets, **kw)
    hook.remove()
    assert sum(encoded) == 64 + 64 + 30  # views of an encoded split reuse its features
    assert encoded[:12] == [10] * 12  # the two tensor splits go through as one stream
    for s in sets:
        for split in ("val", "test"):
            assert scores[s.name][split] == pytest.approx(
                accuracy(model, s.head, getattr(s, split), **kw)
            )
    assert score(model, visual, sets[:1], splits=("test",), **kw) == {
        "all": {"test": scores["all"]["test"]}
    }
    with pytest.raises(ValueError, match="empty/val: needs at least one image"):
        score(model, visual, [EvalSet("empty", head, Subset(data, []), data)], **kw)


def test_tensor_transforms_normalize_and_refuse_another_size(model, transforms):
    train_tf, val_tf = transforms
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    for tf in transforms:
        assert tf(mean.expand(3, 16, 16)).abs().max() < 1e-6
        x = torch.rand(5, 3, 16, 16)
        assert torch.equal(tf(x), (x - mean) / std)  # no augmentation, no resize
        assert torch.equal(tf(x), normalize_images(model, x))
        assert torch.equal(tf(x[2]), tf(x)[2])  # an item as in its batch
        with pytest.raises(ValueError, match=r"\(32, 32\) but the model takes \(16, 16\)"):
            tf(torch.rand(3, 32, 32))
        with pytest.raises(ValueError, match=r"got shape \(16, 16\)"):
            tf(torch.rand(16, 16))


def test_pil_transforms_are_open_clips(model, transforms):
    """PIL images keep open_clip's pipelines: resize + centre crop (val), random crop (train)."""
    cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), get_model_preprocess_cfg(model)))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    want = image_transform_v2(cfg, is_train=False)(image)
    assert want.shape == (3, 16, 16) and torch.equal(transforms[1](image), want)
    torch.manual_seed(3)
    want = image_transform_v2(cfg, is_train=True)(image)
    torch.manual_seed(3)
    assert torch.equal(transforms[0](image), want)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            pick_device("cuda")


def test_load_clip_reads_a_full_state_checkpoint(model, tmp_path):
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    save_file(full_state(model), tmp_path / "pretrained.safetensors")
    loaded, _ = load_clip(str(CONFIG), str(tmp_path / "pretrained.safetensors"))
    expected, got = full_state(model), full_state(loaded)
    assert all(torch.equal(v, got[k]) for k, v in expected.items())
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        load_clip(str(CONFIG), str(tmp_path / "missing.safetensors"))
