"""Resumable fine-tuning: a run killed with SIGKILL and restarted ends bit-identical (CPU)."""

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from fake_data import write_image_folder
from safetensors.torch import load_file

from mergeloom import loops, train
from mergeloom.clip import image_encoder_state

ROOT = Path(__file__).parents[1]
STEPS, EVERY = 12, 2

# One fine-tuning run in its own process: tiny model, ImageFolder data, a resume checkpoint
# every EVERY steps. With SLOW set, each step sleeps (the numerics do not change) so that the
# test can kill the process part-way. Prints the first step it runs (0, or where it resumed).
SCRIPT = textwrap.dedent(f"""
    import os, sys, time
    from pathlib import Path
    import torch
    from torchvision.datasets import ImageFolder
    from safetensors.torch import save_file
    from mergeloom import clip, loops, train
    data, ckpt, out = (Path(a) for a in sys.argv[1:4])
    torch.manual_seed(0)
    model, tokenizer = clip.load_clip("{ROOT / "configs" / "tiny-vit.json"}")
    dataset = ImageFolder(str(data))
    head = clip.zeroshot_head(model, tokenizer, dataset.classes, ["a photo of {{}}."])
    first = []
    def log(step, values):
        if not first:
            first.append(step)
            print("first step", step, flush=True)
        if os.environ.get("SLOW"):
            time.sleep(0.3)
    state = train.finetune(model, head, dataset, transform=loops.transforms(model)[0],
        steps={STEPS}, batch_size=8, lr=1e-3, weight_decay=0.1, warmup_steps=3, seed=7,
        device="cpu", checkpoint=ckpt, checkpoint_every={EVERY}, log=log)
    save_file(state, str(out))
""")


def _run(tmp_path: Path, ckpt: Path, out: Path, slow: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"SLOW": "1"} if slow else {})}
    args = [sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(ckpt), str(out)]
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_killed_run_resumes_to_bit_identical_weights(tmp_path):
    write_image_folder(tmp_path / "data", ["red", "green", "blue"], per_class=10)
    ckpt = tmp_path / "resume" / "expert.pt"

    # the uninterrupted reference runs alongside the run that gets killed
    reference = _run(tmp_path, tmp_path / "unused.pt", tmp_path / "reference.safetensors")
    victim = _run(tmp_path, ckpt, tmp_path / "resumed.safetensors", slow=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a checkpoint past the first one exists
        if ckpt.is_file() and loops.load_checkpoint(ckpt)["step"] >= 2 * EVERY:
            break
        assert victim.poll() is None, victim.stdout.read()
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = loops.load_checkpoint(ckpt)["step"]
    assert 2 * EVERY <= killed_at < STEPS
    assert not (tmp_path / "resumed.safetensors").exists()

    assert reference.wait(timeout=120) == 0, reference.stdout.read()
    resumed = _run(tmp_path, ckpt, tmp_path / "resumed.safetensors")
    assert resumed.wait(timeout=120) == 0
    output = resumed.stdout.read()
    assert f"first step {killed_at}" in output  # it really resumed, not restarted
    assert not ckpt.exists()  # removed after the successful finish
    want, got = (
        load_file(tmp_path / "reference.safetensors"),
        load_file(tmp_path / "resumed.safetensors"),
    )
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_step_batches_resumed_at_any_step_continue_the_same_stream():
    full = list(loops.StepBatches(n=10, batch_size=4, steps=9, seed=3))
    assert [len(b) for b in full[:3]] == [4, 4, 2]  # ceil(10 / 4) batches per epoch, short last
    epoch = sorted(i for b in full[:3] for i, _ in b)
    assert epoch == list(range(10))  # each epoch is a permutation
    for start in range(9):
        assert (
            list(loops.StepBatches(n=10, batch_size=4, steps=9, seed=3, start=start))
            == (full[start:])
        )
    assert full != list(loops.StepBatches(n=10, batch_size=4, steps=9, seed=4))
    assert train.steps_for(10, 4, epochs=3) == 9


def test_augmentation_depends_on_the_sample_seed_only():
    base = torch.utils.data.TensorDataset(torch.zeros(3, 1), torch.arange(3))
    ds = loops.Transformed(base, lambda x: x + torch.rand(1))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b = ds[(1, 123)], ds[(1, 123)]
    assert torch.equal(a[0], b[0]) and a[1] == 1
    assert not torch.equal(a[0], ds[(1, 124)][0])
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched


def test_checkpoint_of_another_run_is_ignored_and_files_are_weights_only(
    tmp_path, tiny_clip, caplog
):
    ckpt = tmp_path / "resume" / "c.pt"
    loops.save_checkpoint(ckpt, {"fingerprint": "someone else", "step": 5, "x": torch.ones(2)})
    assert loops.load_checkpoint(ckpt)["step"] == 5  # torch.load(weights_only=True) reads it
    assert [p.name for p in ckpt.parent.iterdir()] == ["c.pt"]  # no temporary file left
    data = torch.utils.data.TensorDataset(torch.zeros(6, 3, 16, 16), torch.arange(6) % 2)
    steps = []
    caplog.set_level(logging.WARNING, logger=loops.logger.name)
    train.finetune(
        tiny_clip,
        torch.randn(8, 2),
        data,
        transform=lambda x: x,
        steps=2,
        batch_size=3,
        lr=1e-3,
        weight_decay=0.0,
        warmup_steps=0,
        seed=0,
        device="cpu",
        checkpoint=ckpt,
        checkpoint_every=1,
        log=lambda step, values: steps.append((step, ckpt.exists())),
    )
    assert steps == [(0, True), (1, True)]  # from scratch, not from step 5; the file was kept
    assert [r.getMessage() for r in caplog.records if r.name == loops.logger.name] == [
        f"ignoring resume checkpoint {ckpt}: it belongs to another run"
    ]
    assert not ckpt.exists()
    with pytest.raises(ValueError, match="checkpoint_every and num_workers must be >= 0"):
        train.finetune(
            tiny_clip,
            torch.randn(8, 2),
            data,
            transform=lambda x: x,
            steps=2,
            batch_size=3,
            lr=1e-3,
            weight_decay=0.0,
            warmup_steps=0,
            seed=0,
            device="cpu",
            checkpoint_every=-1,
        )


def _short_run(model, start, data, ckpt, log=None):
    """A 4-step fine-tuning from ``start`` with a resume checkpoint after every step."""
    model.load_state_dict(start)
    return train.finetune(
        model,
        data.head,
        data,
        transform=lambda x: x,
        steps=4,
        batch_size=3,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=1,
        seed=0,
        device="cpu",
        checkpoint=ckpt,
        checkpoint_every=1,
        log=log,
    )


class _Boom:
    """Unpickling this would create a file: weights_only must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _truncated(valid: bytes, tmp: Path) -> bytes:
    return valid[: len(valid) // 2]


def _random_bytes(valid: bytes, tmp: Path) -> bytes:
    return random.Random(0).randbytes(len(valid))


def _edited(edit):
    """A valid torch file: the real step-2 checkpoint with ``edit`` applied to its dict."""

    def make(valid: bytes, tmp: Path) -> bytes:
        (tmp / "edit.pt").write_bytes(valid)
        ckpt = torch.load(tmp / "edit.pt", weights_only=True)
        edit(ckpt, tmp)
        torch.save(ckpt, tmp / "edit.pt")
        return (tmp / "edit.pt").read_bytes()

    return make


def _wrong_visual_shape(ckpt, tmp):
    ckpt["visual"]["conv1.weight"] = ckpt["visual"]["conv1.weight"][:-1]


def _optimizer_of_fewer_params(ckpt, tmp):
    group = ckpt["optimizer"]["param_groups"][0]
    group["params"] = group["params"][:-1]


# (bytes written at the checkpoint path from a real step-2 checkpoint, what the warning says).
# Those that keep the step-2 weights but break elsewhere catch a half-applied checkpoint: the
# result would then differ from the uninterrupted run's. (A wrong-shaped optimizer state is
# checked through _resume alone below: fused AdamW aborts the process on one.)
BAD_CHECKPOINTS = {
    "truncated": (_truncated, "(torch.load failed: "),
    "random-bytes": (_random_bytes, "(torch.load failed: "),
    "empty": (lambda valid, tmp: b"", "(torch.load failed: EOFError)"),
    "missing-step": (_edited(lambda c, t: c.pop("step")), "missing keys ['step']"),
    "missing-visual": (_edited(lambda c, t: c.pop("visual")), "missing keys ['visual']"),
    "missing-optimizer": (_edited(lambda c, t: c.pop("optimizer")), "missing keys ['optimizer']"),
    "negative-step": (_edited(lambda c, t: c.update(step=-2)), "step -2 is not a non-negative"),
    "float-step": (_edited(lambda c, t: c.update(step=2.0)), "step 2.0 is not a non-negative"),
    "no-fingerprint": (_edited(lambda c, t: c.pop("fingerprint")), "no fingerprint"),
    "wrong-visual-shape": (_edited(_wrong_visual_shape), "'conv1.weight' has shape"),
    "optimizer-of-fewer-params": (
        _edited(_optimizer_of_fewer_params),
        "ValueError: loaded state dict",
    ),
    "bad-rng": (_edited(lambda c, t: c.update(rng=torch.zeros(3))), "'rng' is not a generator"),
    "pickled-object": (
        _edited(lambda c, t: c.update(step=_Boom(t / "unpickled"))),
        "(torch.load failed: UnpicklingError: Weights only load failed):",
    ),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_unusable_checkpoint_is_named_deleted_and_the_run_starts_afresh(
    case, tmp_path, tiny_clip, caplog
):
    """A truncated, corrupt or malformed resume checkpoint (here made from a real one) gives
    one warning naming the file and why, is deleted before the first step, and the run ends
    bit-identical to an uninterrupted one."""
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.rand(7, 3, 16, 16, generator=g), torch.arange(7) % 2
    )
    data.head = torch.randn(8, 2, generator=g)
    start = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    ckpt = tmp_path / "resume" / "expert.pt"

    valid = {}

    def keep(step, values):  # at step s's log the file holds the checkpoint after s steps
        if step == 2:
            valid["step-2"] = ckpt.read_bytes()

    reference = _short_run(tiny_clip, start, data, ckpt, log=keep)
    assert loops.load_checkpoint(ckpt) is None  # removed after the finish
    (tmp_path / "valid.pt").write_bytes(valid["step-2"])
    assert loops.load_checkpoint(tmp_path / "valid.pt")["step"] == 2  # a real checkpoint

    make, why = BAD_CHECKPOINTS[case]
    ckpt.write_bytes(make(valid["step-2"], tmp_path))
    steps = []
    caplog.set_level(logging.WARNING, logger=loops.logger.name)
    got = _short_run(
        tiny_clip, start, data, ckpt, log=lambda step, v: steps.append((step, ckpt.exists()))
    )
    assert steps == [(0, False), (1, True), (2, True), (3, True)]  # afresh; the bad file gone
    warnings = [r for r in caplog.records if r.name == loops.logger.name]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    message = warnings[0].getMessage()
    assert message.startswith(f"unusable resume checkpoint {ckpt} (")
    assert message.endswith("): deleting it and training this expert from step 0")
    assert why in message and "\n" not in message
    assert not (tmp_path / "unpickled").exists()
    assert not ckpt.exists()
    assert reference.keys() == got.keys()
    assert all(torch.equal(reference[k], got[k]) for k in reference)


def test_unusable_checkpoint_leaves_model_and_optimizer_untouched(tmp_path, tiny_clip):
    """A checkpoint whose image tower loads but whose optimizer state does not: nothing of it
    stays in the model or the optimizer."""
    ckpt = tmp_path / "c.pt"
    params = list(tiny_clip.visual.parameters())
    fresh = torch.optim.AdamW(params, lr=1e-3, fused=True)
    state = fresh.state_dict()
    visual = {k: v + 1 for k, v in image_encoder_state(tiny_clip).items()}
    optimizer = {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": state["param_groups"]}
    optimizer["state"][0].update(exp_avg=torch.zeros(1, 2), exp_avg_sq=torch.zeros(1, 2))
    rng = torch.get_rng_state()
    torch.save(
        {"fingerprint": "f", "step": 2, "visual": visual, "optimizer": optimizer, "rng": rng}, ckpt
    )
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    torch.manual_seed(5)
    rng_before = torch.get_rng_state()
    assert loops._resume(ckpt, "f", tiny_clip, fresh) == 0
    assert not ckpt.exists()
    assert all(torch.equal(before[k], v) for k, v in tiny_clip.state_dict().items())
    assert fresh.state_dict() == state and not fresh.state
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_worker_processes_do_not_change_the_weights(tmp_path, tiny_clip):
    """Augmentation seeds travel with the indices, so decoding in 2 workers gives the weights
    that decoding in this process gives."""
    write_image_folder(tmp_path / "data", ["red", "green"], per_class=6)
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(tmp_path / "data"))
    train_tf = loops.transforms(tiny_clip)[0]
    start = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    head = torch.randn(8, 2)
    results = []
    for workers in (0, 2):
        tiny_clip.load_state_dict(start)
        results.append(
            train.finetune(
                tiny_clip,
                head,
                dataset,
                transform=train_tf,
                steps=4,
                batch_size=5,
                lr=1e-3,
                weight_decay=0.1,
                warmup_steps=1,
                seed=3,
                device="cpu",
                num_workers=workers,
            )
        )
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert any(not torch.equal(results[0][k], start[f"visual.{k}"]) for k in results[0])


def test_gradient_accumulation_matches_the_whole_batch(tiny_clip):
    """Micro-batches of 3, 3, 3, 1 sum to the gradient of the batch mean over all 10 images."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(10, 3, 16, 16, generator=g), torch.arange(10) % 2
    head = torch.randn(8, 2, generator=g)
    tiny_clip.train()
    params = list(tiny_clip.visual.parameters())
    optimizer = torch.optim.SGD(params, lr=0.0)  # keeps the weights, leaves the gradients
    loss, out = train._accumulated_step(tiny_clip, head, x, y, optimizer, None, parts=4)
    accumulated = [p.grad.clone() for p in params]
    optimizer.zero_grad()
    whole = torch.nn.functional.cross_entropy(tiny_clip.encode_image(x, normalize=True) @ head, y)
    whole.backward()
    torch.testing.assert_close(loss, whole.detach(), rtol=1e-5, atol=1e-6)
    assert out.shape == (10, 2)
    for got, p in zip(accumulated, params, strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-7)

    data = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(ValueError, match="accumulate must be >= 1 and divide batch_size 12"):
        train.finetune(
            tiny_clip,
            head,
            data,
            transform=lambda x: x,
            steps=1,
            batch_size=12,
            lr=1e-3,
            weight_decay=0.1,
            warmup_steps=0,
            seed=0,
            device="cpu",
            accumulate=5,
        )
    before = {k: v.clone() for k, v in tiny_clip.visual.state_dict().items()}
    state = train.finetune(
        tiny_clip,
        head,
        data,
        transform=lambda x: x,
        steps=2,
        batch_size=4,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=0,
        seed=0,
        device="cpu",
        accumulate=2,
    )
    assert any(not torch.equal(state[k], before[k]) for k in state)  # it trains
