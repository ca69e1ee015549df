"""Model errors and offline weights: close matches, cache look-up, no download attempts."""

import time

import huggingface_hub.constants
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mergeloom import clip, evaluate, train

HUB_REPO = "models--timm--vit_base_patch32_clip_224.openai"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """An empty Hugging Face cache and home, so no real cache can answer."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def _fake_hub_file(cache, name: str) -> object:
    """The layout huggingface_hub writes: refs/main names the snapshot holding the file."""
    repo = cache / "hub" / HUB_REPO
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    return repo / "snapshots" / "0123abc" / name


def test_unknown_architecture_and_tag_list_close_matches():
    with pytest.raises(
        ValueError, match="unknown open_clip model 'ViT-B32'; close matches: ViT-B-32"
    ):
        clip.load_clip("ViT-B32")
    with pytest.raises(ValueError, match="'opanai'; close matches: openai"):
        clip.load_clip("ViT-B-32", "opanai")
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        clip.load_clip("ViT-B-32", "laion2b_s34b_b97k")


def test_missing_weights_fail_at_once_naming_the_cache_and_a_local_path(empty_caches):
    start = time.monotonic()
    with pytest.raises(ValueError) as err:
        clip.load_clip("ViT-B-32", "openai")
    assert time.monotonic() - start < 5  # open_clip alone retries the hub for about a minute
    message = str(err.value)
    assert str(empty_caches / "hub" / HUB_REPO) in message
    assert "HF_HUB_CACHE" in message and "local checkpoint file" in message
    assert "create_model('ViT-B-32', pretrained='openai')" in message


def test_cached_weights_are_found_where_open_clip_downloads_them(empty_caches):
    assert clip.cached_weights("ViT-B-32", "openai")[0] is None
    path = _fake_hub_file(empty_caches, "open_clip_model.safetensors")
    path.write_bytes(b"x")
    assert clip.cached_weights("ViT-B-32", "openai")[0] == str(path)
    url_file = empty_caches / "home" / ".cache" / "clip" / "ViT-B-16.pt"  # a URL tag's place
    url_file.parent.mkdir(parents=True)
    url_file.write_bytes(b"x")
    assert clip.cached_weights("ViT-B-16", "openai") == (
        str(url_file),
        [
            f"{empty_caches}/hub/models--timm--vit_base_patch16_clip_224.openai/snapshots/*/{name}"
            for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        ]
        + [str(url_file)],
    )


@pytest.mark.slow
def test_vit_b32_offline_load_finetuning_step_and_evaluation_on_cpu(empty_caches):
    """ViT-B-32 at full size (random init, no download): the cached 'openai' tag loads offline
    with QuickGELU as the tag requires; one fine-tuning step and an evaluation at 224x224."""
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    save_file(
        reference.state_dict(), str(_fake_hub_file(empty_caches, "open_clip_model.safetensors"))
    )
    model, tokenizer = clip.load_clip("ViT-B-32", "openai")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    del reference

    classes = ["cat", "dog", "car"]
    head = clip.zeroshot_head(model, tokenizer, classes, ["a photo of a {}."])
    images = torch.rand(8, 3, 224, 224)
    labels = torch.arange(8) % 3
    data = torch.utils.data.TensorDataset(images, labels)
    before = clip.image_encoder_state(model)
    state = train.finetune(
        model,
        head,
        data,
        transform=lambda x: x,
        steps=1,
        batch_size=4,
        lr=1e-5,
        weight_decay=0.1,
        warmup_steps=0,
        seed=0,
        device="cpu",
        num_classes=3,
    )
    assert state.keys() == before.keys() and len(state) > 100
    assert not torch.equal(state["conv1.weight"], before["conv1.weight"])
    feats = evaluate.features(model, data, transform=lambda x: x, batch_size=4, device="cpu")
    assert feats.shape == (8, model.visual.output_dim)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(8))
    acc = evaluate.accuracy(
        model, head, data, transform=lambda x: x, batch_size=4, device="cpu", num_classes=3
    )
    assert acc == ((feats @ head).argmax(dim=1) == labels).float().mean().item()
