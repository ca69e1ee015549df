"""The scorer of the baseline, merge and weave stages: updates written into the model key by key
equal loading the merged state dict, the text tower is not needed, and scores match evaluate."""

import pytest
import torch

from mergeloom import clip, evaluate, loops, scoring, vectors
from mergeloom.protocol import EvalSet
from mergeloom.tasks import TensorImages


def _delta(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = clip.image_encoder_state(model)
    return {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def test_update_in_place_equals_loading_the_merged_state(tiny_clip, tmp_path):
    theta0 = clip.image_encoder_state(tiny_clip)
    vectors.save(theta0, tmp_path / "visual.safetensors")
    delta = _delta(tiny_clip, 0)
    clip.load_image_encoder(tiny_clip, vectors.apply(theta0, delta))
    merged = clip.image_encoder_state(tiny_clip)
    clip.load_image_encoder(tiny_clip, theta0)
    lazy = vectors.SafetensorsFile(tmp_path / "visual.safetensors")
    partial = {k: v for k, v in list(delta.items())[1:]}  # a missing key keeps theta_0's value
    clip.load_image_encoder_update(tiny_clip, lazy, delta)
    assert all(torch.equal(v, merged[k]) for k, v in clip.image_encoder_state(tiny_clip).items())
    clip.load_image_encoder_update(tiny_clip, lazy, partial)
    first = next(iter(delta))
    assert torch.equal(clip.image_encoder_state(tiny_clip)[first], theta0[first])
    with pytest.raises(ValueError, match=r"1 update keys the image tower lacks \['text.w'\]"):
        clip.load_image_encoder_update(tiny_clip, lazy, {**delta, "text.w": torch.zeros(1)})
    bad = {**theta0, first: torch.zeros(3)}
    with pytest.raises(ValueError, match=f"{first!r} has shape \\(3,\\)"):
        clip.load_image_encoder_update(tiny_clip, bad, {})


def test_dropping_the_text_tower_keeps_the_image_features(tiny_clip):
    images = torch.rand(4, 3, 16, 16)
    before = tiny_clip.encode_image(images, normalize=True)
    clip.drop_text_tower(tiny_clip)
    assert torch.equal(tiny_clip.encode_image(images, normalize=True), before)
    assert all(k.startswith("visual.") or k.startswith("logit_") for k in tiny_clip.state_dict())


def test_scorer_scores_updates_and_whole_towers_as_evaluate_does(tiny_clip, tmp_path):
    vectors.save(clip.full_state(tiny_clip), tmp_path / "full.safetensors")
    vectors.save(clip.image_encoder_state(tiny_clip), tmp_path / "visual.safetensors")
    g = torch.Generator().manual_seed(1)
    data = TensorImages(torch.rand(40, 3, 16, 16, generator=g), torch.randint(0, 3, (40,)))
    sets = [EvalSet("t", torch.randn(8, 3, generator=g), data, data)]
    score = scoring.scorer("tiny-vit", tmp_path / "full.safetensors",
                           tmp_path / "visual.safetensors", device="cpu", batch_size=16,
                           num_workers=0)  # fmt: skip
    delta = _delta(tiny_clip, 2)
    theta0 = clip.image_encoder_state(tiny_clip)
    _, val_tf = loops.transforms(tiny_clip)
    kw = {"transform": val_tf, "batch_size": 16, "device": "cpu"}
    expected = evaluate.score(tiny_clip, vectors.apply(theta0, delta), sets, **kw)
    assert score(sets, delta=delta) == expected
    assert score(sets, visual=theta0) == score(sets, delta={})
    assert score(sets, delta={}) == evaluate.score(tiny_clip, theta0, sets, **kw)
    with pytest.raises(ValueError, match="exactly one of delta= and visual="):
        score(sets)
