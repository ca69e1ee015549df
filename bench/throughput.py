"""Fine-tuning and evaluation throughput of ViT-B-32: our loops vs a plain open_clip loop.

    python bench/throughput.py --device auto --batch-size 128 --steps 30 --warmup 5 \
        --eval-batches 20 --out bench/results/throughput_gpu.json

ViT-B-32 at random init (no download) on synthetic 224x224 inputs already in memory, so the
numbers measure the training step and the forward pass, not image decoding. Both sides run in
one process, on the same model and batches, alternating A/B/A/B so that drift (clock boost,
other load) hits both:

* ours: ``mergeloom.train.finetune`` / ``mergeloom.evaluate.accuracy`` (DataLoader with the
  seeded step sampler, bf16 autocast on CUDA, fused AdamW, cosine schedule, grad clipping);
* plain: the loop open_clip's README suggests: ``encode_image`` -> logits through the head ->
  cross-entropy -> backward -> clip -> AdamW step, with the same autocast and optimizer.

Steps per second are timed from the end of the warm-up steps to the last step (synchronised
on CUDA); evaluation images per second over ``--eval-batches`` batches after one warm-up batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mergeloom import clip, evaluate, train  # noqa: E402
from mergeloom.device import pick_device  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " + (
        f"{torch.get_num_threads()} torch threads"
    )


def ours_finetune(model, head, data, args, device) -> float:
    stamps = []

    def log(step, values):  # .item() in the log syncs, so the stamp is after the step ran
        stamps.append(time.perf_counter())

    train.finetune(
        model,
        head,
        data,
        transform=lambda x: x,
        steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        lr=1e-5,
        weight_decay=0.1,
        warmup_steps=0,
        seed=0,
        device=device,
        num_workers=0,
        log=log,
    )
    return args.steps / (stamps[-1] - stamps[args.warmup - 1])


def plain_finetune(model, head, data, args, device) -> float:
    model.to(device).train()
    head = head.to(device)
    params = list(model.visual.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True)
    images, labels = data.tensors
    g = torch.Generator().manual_seed(0)
    stamps = []
    for _ in range(args.warmup + args.steps):
        idx = torch.randint(len(images), (args.batch_size,), generator=g)
        x, y = images[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model.encode_image(x, normalize=True) @ head
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loss.item()  # as ours: one sync per step
        stamps.append(time.perf_counter())
    model.eval()
    return args.steps / (stamps[-1] - stamps[args.warmup - 1])


def ours_eval(model, head, data, args, device) -> float:
    n = args.batch_size * (args.eval_batches + 1)
    subset = torch.utils.data.TensorDataset(*(t[:n] for t in data.tensors))
    warm = torch.utils.data.TensorDataset(*(t[: args.batch_size] for t in data.tensors))
    evaluate.accuracy(
        model, head, warm, transform=lambda x: x, batch_size=args.batch_size, device=device
    )
    _sync(device)
    start = time.perf_counter()
    evaluate.accuracy(
        model, head, subset, transform=lambda x: x, batch_size=args.batch_size, device=device
    )
    _sync(device)
    return n / (time.perf_counter() - start)


def plain_eval(model, head, data, args, device) -> float:
    model.to(device).eval()
    head = head.to(device)
    images = data.tensors[0]
    n = args.batch_size * (args.eval_batches + 1)

    def run(count):
        preds = []
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
        ):
            for start in range(0, count, args.batch_size):
                x = images[start : start + args.batch_size].to(device, non_blocking=True)
                preds.append((model.encode_image(x, normalize=True) @ head).argmax(1).cpu())
        return preds

    run(args.batch_size)
    _sync(device)
    start = time.perf_counter()
    run(n)
    _sync(device)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed fine-tuning steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1)")
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds; the median is kept")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    head = torch.nn.functional.normalize(torch.randn(model.visual.output_dim, 10), dim=0) * 100
    n = max(args.batch_size * (args.eval_batches + 1), args.batch_size * 4)
    data = torch.utils.data.TensorDataset(torch.rand(n, 3, 224, 224), torch.arange(n) % 10)
    initial = clip.image_encoder_state(model)
    runs = {
        "finetune_steps_per_s": {"ours": [], "plain": []},
        "eval_images_per_s": {"ours": [], "plain": []},
    }
    for _ in range(args.rounds):
        for name, fn in (("ours", ours_finetune), ("plain", plain_finetune)):
            clip.load_image_encoder(model, initial)
            runs["finetune_steps_per_s"][name].append(fn(model, head, data, args, device))
        for name, fn in (("ours", ours_eval), ("plain", plain_eval)):
            runs["eval_images_per_s"][name].append(fn(model, head, data, args, device))
    result = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "settings": vars(args) | {"out": str(args.out), "device": str(device)},
        "runs": runs,
        "load_average_1min_after": os.getloadavg()[0],  # other processes share a CPU machine
    }
    for metric, sides in runs.items():
        ours, plain = statistics.median(sides["ours"]), statistics.median(sides["plain"])
        result[metric] = {"ours": ours, "plain": plain, "ours_over_plain": ours / plain}
        print(f"{metric}: ours {ours:.3f}  plain {plain:.3f}  ratio {ours / plain:.3f}")
    print(f"device: {result['device']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
