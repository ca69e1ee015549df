"""Zero-shot classification heads from the pretrained text tower, one per task, frozen after.

    python -m stages.heads --pretrained models/pretrained.safetensors --data-dir data \
        --out models/heads

Writes `<out>/<setup>/<task>.safetensors` for every task of every setup (continual: each split's
subset head for training, and `all`, the head of every class, for evaluation).
"""

import argparse
from pathlib import Path

from mergeloom import clip, setups, vectors
from stages import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--pretrained", "--data-dir", "--out"):
        parser.add_argument(name, type=Path, required=True)
    args = common.parse_args(parser, argv)
    p = common.load_params("model", "data", "setups")
    root = common.runtime()["datasets_root"]
    model, tokenizer = clip.load_clip(p["model"]["name"])
    clip.load_full_state(model, vectors.load(args.pretrained))
    written = 0
    for setup, cfg in p["setups"].items():
        loaded = setups.load_tasks(setup, cfg, p["data"], data_dir=args.data_dir,
                                   datasets_root=root)  # fmt: skip
        for name, task in loaded.items():
            head = clip.zeroshot_head(model, tokenizer, task.classnames, task.templates)
            vectors.save({"head": head.contiguous()}, args.out / setup / f"{name}.safetensors")
            written += 1
    common.log.info("wrote %d zero-shot heads to %s", written, args.out)


if __name__ == "__main__":
    common.run(main)
