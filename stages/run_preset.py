"""Run a real-scale preset end to end: experts (resumable), task vectors, merges, weaving, scores.

    python -m stages.run_preset presets/vit-b-32-8tasks.yaml --out runs/vit-b-32-8tasks

Writes under --out: ``pretrained_visual.safetensors`` (theta_0's image tower),
``experts/<task>.safetensors``, and ``metrics.json`` (test accuracy of zero-shot, every expert,
every merge at its data-free default and every woven merge, per problem and evaluation set).
Resume checkpoints live in --resume-dir (default ``.resume/<out name>``, outside anything DVC
deletes) and are removed as each expert finishes; an expert whose file exists is not retrained,
so rerunning the command after an interruption continues where it stopped. ``--expert NAME``
trains that expert only (one DVC stage per expert: ``stages.preset_pipeline``).
"""

import argparse
import logging
from pathlib import Path

import torch

from mergeloom import clip, loops, methods, vectors, weave
from stages import common, preset

log = logging.getLogger("stages.run_preset")


def _score(model, visual, sets: dict, heads: dict, p: dict, val_tf, device) -> dict:
    clip.load_image_encoder(model, visual)
    opts = {
        "transform": val_tf,
        "batch_size": p["evaluate"]["batch_size"],
        "device": device,
        "num_workers": p["datasets"]["num_workers"],
    }
    return {
        name: loops.accuracy_loader(
            model, heads[name], task.test, num_classes=len(task.classnames), **opts
        )
        for name, task in sets.items()
    }


def _expert(p, name: str, task, model, head, init, args, train_tf, device) -> Path:
    """Train one expert from ``init`` (resumable) unless its file exists; its path."""
    ft, path = p["finetune"], args.out / "experts" / f"{name}.safetensors"
    if path.is_file():
        log.info("expert %s exists, not retrained: %s", name, path)
        return path
    clip.load_image_encoder(model, init)
    steps = loops.steps_for(len(task.train), ft["batch_size"], preset.epochs(p, name))
    keys = ("batch_size", "lr", "weight_decay", "warmup_steps", "seed", "grad_clip", "accumulate")
    hp = {k: ft[k] for k in (*keys, "checkpoint_every")}
    state = loops.finetune_loader(
        model,
        head,
        task.train,
        transform=train_tf,
        steps=steps,
        device=device,
        num_workers=p["datasets"]["num_workers"],
        checkpoint=args.resume_dir / f"{name}.pt",
        num_classes=len(task.classnames),
        **hp,
    )
    vectors.save(state, path, metadata={"task": name, "steps": str(steps)})
    return path


def _experts(p, plan, model, heads, theta0, args, train_tf, device) -> dict:
    """Every expert (or only ``args.expert``) in order; a sequential chain starts each from the
    previous expert's file, so one expert can be trained alone once its predecessor exists."""
    names, experts = list(plan.train), {}
    for i, name in enumerate(names):
        prev = args.out / "experts" / f"{names[i - 1]}.safetensors" if i else None
        if args.expert not in (None, name):
            continue
        if p["finetune"]["sequential"] and prev is not None and not prev.is_file():
            raise ValueError(f"sequential fine-tuning: {name} starts from {prev}, which is missing")
        init = vectors.load(prev) if p["finetune"]["sequential"] and prev else theta0
        path = _expert(
            p, name, plan.train[name], model, heads[f"train/{name}"], init, args, train_tf, device
        )
        experts[name] = vectors.load(path)
    return experts


def _merges(p, members: list, theta0) -> dict:
    """Every merge at its data-free default, and every woven merge: name -> image tower."""
    out = {m: vectors.apply(theta0, methods.get(m)(members, **hp)) for m, hp in p["merge"].items()}
    w = p.get("weave") or {}
    for m in w.get("methods", []):
        hp = {k: v for k, v in p["merge"][m].items() if k != "lam"}
        for pool in w["pools"]:
            pool_hp = {k: v for k, v in (p["merge"].get(pool) or {}).items() if k != "lam"}
            delta = weave.weave(
                m,
                members,
                {"lam": w["lambdas"]},
                pool,
                seed=w["seed"],
                collaborative=w["collaborative"],
                hyperparameters=hp,
                pool_hyperparameters=pool_hp,
            )
            out[f"weave/{m}/{pool}"] = vectors.apply(theta0, delta)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume-dir", type=Path, help="default: .resume/<out name>")
    parser.add_argument("--expert", help="train only this expert, then stop")
    args = parser.parse_args(argv)
    args.resume_dir = args.resume_dir or Path(".resume") / args.out.name
    p = preset.load(args.preset)
    plan = preset.plan(p)  # reads the datasets first: a missing one fails before the model loads
    device = clip.pick_device(p["model"]["device"])
    torch.manual_seed(p["finetune"]["seed"])
    model, tokenizer = clip.load_clip(p["model"]["name"], p["model"]["pretrained"])
    train_tf, val_tf = loops.transforms(model)
    heads = {
        f"train/{n}": clip.zeroshot_head(model, tokenizer, t.classnames, t.templates)
        for n, t in plan.train.items()
    }
    heads |= {
        n: clip.zeroshot_head(model, tokenizer, t.classnames, t.templates)
        for n, t in plan.eval_sets.items()
    }
    theta0 = clip.image_encoder_state(model)
    experts = _experts(p, plan, model, heads, theta0, args, train_tf, device)
    if args.expert is not None:
        if not experts:
            raise ValueError(f"--expert {args.expert!r} is not one of {list(plan.train)}")
        return
    vectors.save(theta0, args.out / "pretrained_visual.safetensors")
    metrics: dict = {"zero_shot": _score(model, theta0, plan.eval_sets, heads, p, val_tf, device)}
    metrics["experts"] = {
        n: _score(
            model, e, {s: plan.eval_sets[s] for s in plan.expert_sets[n]}, heads, p, val_tf, device
        )
        for n, e in experts.items()
    }
    for problem, (members, sets) in plan.problems.items():
        tvs = [vectors.subtract(experts[n], theta0) for n in members]
        for name, visual in _merges(p, tvs, theta0).items():
            scores = _score(
                model, visual, {s: plan.eval_sets[s] for s in sets}, heads, p, val_tf, device
            )
            metrics.setdefault("merged", {}).setdefault(problem, {})[name] = scores
    common.write_json(args.out / "metrics.json", metrics)


if __name__ == "__main__":
    common.run(main)
