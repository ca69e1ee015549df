"""Write synthetic ViT-B-32 "experts" for the merging benchmark (run with the project's venv).

No real checkpoints can be downloaded here, so the benchmark uses open_clip's ViT-B-32 visual
tower at its (seeded) random init as the pretrained model, and experts that differ from it by
small dense random task vectors: expert_i = pretrained + 0.01 * randn (own seed per expert).
That has the real keys/shapes (~88M fp32 params), which is what time and memory depend on.
Experts are built one at a time and written atomically (temp name, then rename).
"""

import argparse
import os
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

NOISE_STD = 0.01


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--num-experts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
    pretrained = {k: v.detach().float().contiguous() for k, v in visual.state_dict().items()}
    del visual
    save_atomic(pretrained, args.out_dir / "pretrained.safetensors")

    for i in range(args.num_experts):
        gen = torch.Generator().manual_seed(args.seed * 100_003 + i + 1)
        expert = {
            k: v + NOISE_STD * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            for k, v in pretrained.items()
        }
        save_atomic(expert, args.out_dir / f"expert_{i}.safetensors")
        del expert
    n = sum(v.numel() for v in pretrained.values())
    print(f"wrote pretrained + {args.num_experts} experts ({n} params each) to {args.out_dir}")


if __name__ == "__main__":
    main()
