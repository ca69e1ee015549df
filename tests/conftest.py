"""Shared fixtures: small ViT-shaped task vectors and a tiny open_clip model (no downloads)."""

import json

import open_clip
import pytest
import torch

TINY_CLIP = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 4, "head_width": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def vit_like(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Keys and shapes of the kinds found in an open_clip ViT image tower (scaled down)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "conv1.weight": (6, 3, 2, 2),
        "positional_embedding": (5, 6),
        "transformer.resblocks.0.attn.in_proj_weight": (18, 6),
        "transformer.resblocks.0.attn.in_proj_bias": (18,),
        "transformer.resblocks.0.ln_1.weight": (6,),
        "transformer.resblocks.0.mlp.c_fc.weight": (24, 6),
        "proj": (6, 4),
        "logit_scale": (),
    }
    return {k: scale * torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.fixture
def task_vectors():
    return [vit_like(seed) for seed in range(3)]


@pytest.fixture
def tiny_clip(tmp_path, monkeypatch):
    """A tiny open_clip CLIP registered from a JSON config, as open_clip's own tests do."""
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    path = tmp_path / "tiny-vit.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model("tiny-vit", pretrained=None)
