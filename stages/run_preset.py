"""Run a real-scale preset end to end: experts (resumable), task vectors, merges, weaving, scores.

    python -m stages.run_preset presets/vit-b-32-8tasks.yaml --out runs/vit-b-32-8tasks

Writes under --out: ``pretrained_visual.safetensors`` (theta_0's image tower),
``experts/<task>.safetensors``, and ``metrics.json`` (test accuracy of zero-shot, every expert,
every merge at its data-free default and every woven merge, per problem and evaluation set).
Resume checkpoints live in ``<out>/.resume/`` and are removed as each expert finishes; an expert
whose file exists is not retrained, so rerunning the command after an interruption continues
where it stopped. (Wiring presets into DVC stages is the next step; this command runs the same
library calls in one process.)
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


def _experts(p, plan, model, heads, theta0, out: Path, train_tf, device) -> dict:
    """Train (or reuse) every expert in order; sequential chains start from the previous one."""
    ft, experts, init = p["finetune"], {}, theta0
    for name, task in plan.train.items():
        path = out / "experts" / f"{name}.safetensors"
        if path.is_file():
            log.info("expert %s exists, not retrained: %s", name, path)
        else:
            clip.load_image_encoder(model, init)
            steps = loops.steps_for(len(task.train), ft["batch_size"], preset.epochs(p, name))
            state = loops.finetune_loader(
                model,
                heads[f"train/{name}"],
                task.train,
                transform=train_tf,
                steps=steps,
                batch_size=ft["batch_size"],
                lr=ft["lr"],
                weight_decay=ft["weight_decay"],
                warmup_steps=ft["warmup_steps"],
                seed=ft["seed"],
                grad_clip=ft["grad_clip"],
                device=device,
                num_workers=p["datasets"]["num_workers"],
                checkpoint=out / ".resume" / f"{name}.pt",
                checkpoint_every=ft["checkpoint_every"],
                num_classes=len(task.classnames),
            )
            vectors.save(state, path, metadata={"task": name, "steps": str(steps)})
        experts[name] = vectors.load(path)
        init = experts[name] if ft["sequential"] else theta0
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
    args = parser.parse_args(argv)
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
    vectors.save(theta0, args.out / "pretrained_visual.safetensors")
    experts = _experts(p, plan, model, heads, theta0, args.out, train_tf, device)
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
