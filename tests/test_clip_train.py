"""open_clip glue, training loops and evaluation on the tiny config in configs/ (CPU, offline)."""

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeloom.clip import (
    full_state,
    image_encoder_state,
    load_clip,
    load_full_state,
    load_image_encoder,
    logits,
    normalize_images,
    pick_device,
    zeroshot_head,
)
from mergeloom.evaluate import accuracy, predict
from mergeloom.train import cosine_schedule, finetune, pretrain

CONFIG = Path(__file__).parents[1] / "configs" / "tiny-vit.json"
CLASSES = ["red", "green", "blue", "gray"]
TEMPLATES = ["a photo of {}.", "a {} thing."]
FT = dict(batch_size=16, lr=1e-3, weight_decay=0.1, warmup_steps=2, seed=0, device="cpu")


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
    return (0.6 * colours[:, :, None, None] + 0.4 * noise).clamp(0, 1), labels


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
    images = data[0][:5]
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


def test_finetune_trains_only_the_image_tower_and_fits(model, head, data):
    images, labels = data
    before = full_state(model)
    history = []
    kw = FT | dict(batch_size=64, warmup_steps=5)
    state = finetune(
        model, head, images, labels, steps=40, log=lambda s, d: history.append(d), **kw
    )
    after = full_state(model)
    text = [k for k in before if not k.startswith("visual.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    assert all(torch.equal(v, after[f"visual.{k}"]) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert len(history) == 40 and set(history[0]) == {"loss", "accuracy", "lr"}
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]
    assert accuracy(model, head, images, labels, device="cpu") >= 0.95


def test_finetune_is_deterministic(built, head, data):
    images, labels = data
    runs = [
        finetune(copy.deepcopy(built[0]), head, images, labels, steps=3, **FT | dict(seed=seed))
        for seed in (0, 0, 1)
    ]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["proj"], runs[2]["proj"])  # the seed picks the batches


def test_finetune_rejects_bad_input(model, head, data):
    images, labels = data
    with pytest.raises(ValueError, match="labels go up to 9 but the head has 2 classes"):
        finetune(model, head[:, :2], images[:10], torch.arange(10), steps=1, **FT)
    with pytest.raises(ValueError, match="10 images, 9"):
        finetune(model, head, images[:10], labels[:9], steps=1, **FT)
    for bad in (dict(steps=0), dict(steps=1, batch_size=0), dict(steps=1, lr=0.0)):
        with pytest.raises(ValueError, match="need steps >= 1"):
            finetune(model, head, images, labels, **FT | bad)


def test_long_warmup_still_trains_and_warns(model, head, data, caplog):
    history = []
    with caplog.at_level(logging.WARNING, logger="mergeloom.train"):
        finetune(
            model,
            head,
            *data,
            steps=2,
            log=lambda s, d: history.append(d),
            **FT | dict(warmup_steps=8),
        )
    assert "longer than training" in caplog.text
    assert [h["lr"] for h in history] == pytest.approx([1e-3 / 8, 2e-3 / 8])


def test_pretrain_lowers_the_contrastive_loss(model, tokenizer, data):
    images, labels = data
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


def test_accuracy_equals_manual_computation(model, head, data):
    images, labels = data
    preds = predict(model, head, images, batch_size=7, device="cpu")
    assert preds.dtype == torch.int64 and preds.shape == (64,)
    with torch.no_grad():
        manual = (logits(model, head, images).argmax(dim=1) == labels).float().mean().item()
    assert torch.equal(preds, logits(model, head, images).argmax(dim=1))
    acc = accuracy(model, head, images, labels, batch_size=7, device="cpu")
    assert 0.0 <= acc <= 1.0 and acc == pytest.approx(manual)
    assert accuracy(model, head, images, (preds + 1) % 4, device="cpu") == 0.0
    with pytest.raises(ValueError, match="64 images and 3 labels"):
        accuracy(model, head, images, labels[:3], device="cpu")


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
