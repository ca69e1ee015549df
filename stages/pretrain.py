"""The pretrained CLIP: trained contrastively on captioned digits, or published weights.

    python -m stages.pretrain --data data/pretrain.safetensors --out models/pretrained.safetensors \
        --visual-out models/pretrained_visual.safetensors --logs logs/pretrain
"""

import argparse
import json
from pathlib import Path

from dvclive import Live

from mergeloom import clip, train, vectors
from stages import common

LOG_EVERY = 25


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--data", "--out", "--visual-out", "--logs"):
        parser.add_argument(name, type=Path, required=True)
    args = parser.parse_args(argv)
    p = common.load_params("model", "pretrain")
    cfg, device = p["pretrain"], clip.pick_device(p["model"]["device"])
    common.seed_everything(cfg["seed"])
    model, tokenizer = clip.load_clip(p["model"]["name"], p["model"]["pretrained"])
    with Live(str(args.logs), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        if p["model"]["pretrained"] is None:
            source = vectors.SafetensorsFile(args.data)
            captions = json.loads(source.metadata["captions"])

            def log(step: int, values: dict) -> None:
                if step % LOG_EVERY == 0 or step == cfg["steps"]:
                    live.step = step
                    for key, value in values.items():
                        live.log_metric(f"pretrain/{key}", float(value))

            train.pretrain(model, tokenizer, source["images"], captions, log=log, device=device,
                           **cfg)  # fmt: skip
        live.summary["pretrained_from"] = p["model"]["pretrained"] or "scratch"
    model.cpu()
    vectors.save(clip.full_state(model), args.out)
    vectors.save(clip.image_encoder_state(model), args.visual_out)


if __name__ == "__main__":
    common.run(main)
