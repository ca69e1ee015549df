"""theta_0: a CLIP trained contrastively on captioned digits, or published weights exported.

    python -m stages.pretrain --out models/pretrained.safetensors \
        --visual-out models/pretrained_visual.safetensors --logs logs/pretrain \
        [--data data/pretrain.safetensors]

With `model.pretrained: null` the model is trained from scratch on `--data`; otherwise the
published weights (an open_clip tag read from its local cache, or a checkpoint path) are
exported, so every later stage reads theta_0 from one safetensors file.
"""

import argparse
import json
from pathlib import Path

import torch
from dvclive import Live

from mergeloom import clip, train, vectors
from mergeloom.device import pick_device
from stages import common

LOG_EVERY = 25


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--out", "--visual-out", "--logs"):
        parser.add_argument(name, type=Path, required=True)
    parser.add_argument("--data", type=Path, help="captioned images (when training)")
    args = common.parse_args(parser, argv)
    m = common.load_params("model")["model"]
    for key in ("name", "pretrained"):  # a user's file DVC could delete is refused
        if m[key] and Path(m[key]).exists():
            common.check_outside_outputs(m[key], f"model.{key}")
    trained = m["pretrained"] is None
    cfg = common.load_params("pretrain")["pretrain"] if trained else None
    if trained and args.data is None:
        raise ValueError("model.pretrained is null: give --data to train theta_0")
    if trained:  # the random init is part of the run: seed it
        torch.manual_seed(cfg["seed"])
    model, tokenizer = clip.load_clip(m["name"], m["pretrained"])
    with Live(str(args.logs), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        if trained:
            source = vectors.SafetensorsFile(args.data)
            captions = json.loads(source.metadata["captions"])

            def log(step: int, values: dict) -> None:
                if step % LOG_EVERY == 0 or step == cfg["steps"]:
                    live.step = step
                    for key, value in values.items():
                        live.log_metric(f"pretrain/{key}", float(value))

            device = pick_device(common.runtime()["device"])
            train.pretrain(model, tokenizer, source["images"], captions, log=log, device=device,
                           **cfg)  # fmt: skip
        live.summary["pretrained_from"] = m["pretrained"] or "scratch"
    model.cpu()
    vectors.save(clip.full_state(model), args.out)
    vectors.save(clip.image_encoder_state(model), args.visual_out)
    how = f"trained for {cfg['steps']} steps" if trained else f"exported from {m['pretrained']}"
    common.log.info("theta_0 %s; wrote %s and %s", how, args.out, args.visual_out)


if __name__ == "__main__":
    common.run(main)
