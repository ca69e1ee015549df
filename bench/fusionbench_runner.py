"""Run one FusionBench merging method on safetensors state dicts (the FusionBench side of bench/).

Run with .bench/fusionbench-venv/bin/python (see bench/setup_fusionbench.sh). It uses FusionBench's
own algorithm classes exactly as its Python API is meant to be used: a BaseModelPool whose entries
are model configs (`_target_` + path) that FusionBench instantiates lazily via `load_model`, the
way its CLI model pools load checkpoints from disk, so each algorithm decides itself how many
models it holds at once. Each model is a plain nn.Module whose parameters carry the file's keys
(open_clip ViT-B-32 visual keys), so no open_clip is needed here. Everything is forced to CPU
(algorithms using LightningFabricMixin get a CPU Fabric; their utilities default to cuda).

Prints one JSON line on stdout: {"method", "wall_s" (load + merge), "import_s", "save_s",
"fusionbench_version"}; everything FusionBench prints goes to stderr (stdout fd points there).
"""

import argparse
import json
import os
import sys
import time

T_START = time.perf_counter()

# name -> (FusionBench class in fusion_bench.method, kwargs). Values are FusionBench's defaults from
# fusion_bench_config/method/*.yaml, except where noted.
METHODS = {
    # config task_arithmetic.yaml: scaling_factor 0.3
    "task_arithmetic": ("TaskArithmeticAlgorithm", {"scaling_factor": 0.3}),
    # config ties_merging.yaml: keep top-20% magnitudes (threshold=k=20), sum, scaling 0.3
    "ties": (
        "TiesMergingAlgorithm",
        {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "sum"},
    ),
    # config task_singular_vector/TaskSingularVectorMerging.yaml: alpha 1
    "tsv_m": ("TaskSingularVectorMerging", {"alpha": 1.0, "exclude_keys": None}),
    # config magmax/magmax.yaml: scaling_factor 0.5
    "magmax": ("MagMaxAlgorithm", {"scaling_factor": 0.5}),
    # config isotropic_merging/iso_c.yaml / iso_cts.yaml
    "iso_c": ("ISO_C_Merge", {"scaling_factor": 1.0, "exclude_keys": None}),
    "iso_cts": (
        "ISO_CTS_Merge",
        {"scaling_factor": 1.0, "common_space_fraction": 0.8, "exclude_keys": None},
    ),
    # config dare/task_arithmetic.yaml (random drop: torch is seeded with --seed)
    "dare": (
        "DareTaskArithmetic",
        {
            "scaling_factor": 0.3,
            "sparsity_ratio": 0.5,
            "only_on_linear_weights": False,
            "rescale": True,
        },
    ),
    # config dare/ties_merging.yaml
    "dare_ties": (
        "DareTiesMerging",
        {
            "sparsity_ratio": 0.5,
            "only_on_linear_weights": False,
            "rescale": True,
            "scaling_factor": 0.5,
            "threshold": 20,
            "remove_keys": [],
            "merge_func": "sum",
        },
    ),
    # config simple_average.yaml (plain weight averaging of the experts)
    "weight_averaging": ("SimpleAverageAlgorithm", {}),
    # config wudi/wudi.yaml: 400 Adam steps per 2-D weight (very slow without a GPU)
    "wudi": ("WUDIMerging", {"iter_num": 400, "exclude_keys": None}),
}


def load_module(path: str):
    """Model factory named in the pool's configs: a module whose parameters are the file's."""
    from safetensors.torch import load_file
    from torch import nn

    root = nn.Module()
    for key, tensor in load_file(path, device="cpu").items():
        *parents, leaf = key.split(".")
        mod = root
        for name in parents:
            if name not in mod._modules:
                mod.add_module(name, nn.Module())
            mod = mod._modules[name]
        mod.register_parameter(leaf, nn.Parameter(tensor))  # requires_grad: DARE selects on it
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True, choices=sorted(METHODS))
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--experts", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    json_out = os.fdopen(os.dup(1), "w")  # keep the real stdout for the JSON line only
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import importlib.metadata

    import fusion_bench.method as fb_method
    import lightning as L
    import torch
    from fusion_bench.mixins import LightningFabricMixin
    from fusion_bench.modelpool import BaseModelPool
    from safetensors.torch import save_file

    import_s = time.perf_counter() - T_START

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    target = f"{__name__}.load_module"  # "__main__.load_module" when run as a script
    models = {"_pretrained_": {"_target_": target, "path": args.pretrained}}
    models |= {f"expert_{i}": {"_target_": target, "path": p} for i, p in enumerate(args.experts)}
    modelpool = BaseModelPool(models)

    cls_name, kwargs = METHODS[args.method]
    algorithm = getattr(fb_method, cls_name)(**kwargs)
    if isinstance(algorithm, LightningFabricMixin):
        algorithm._fabric_instance = L.Fabric(accelerator="cpu", devices=1)  # not cuda
        algorithm._fabric_instance.launch()
    merged = algorithm.run(modelpool)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in merged.state_dict().items()
    }
    wall_s = time.perf_counter() - t0
    save_file(state, args.out)
    save_s = time.perf_counter() - t0 - wall_s

    print(
        json.dumps(
            {
                "method": args.method,
                "wall_s": round(wall_s, 3),
                "import_s": round(import_s, 3),
                "save_s": round(save_s, 3),
                "fusionbench_version": importlib.metadata.version("fusion-bench"),
            }
        ),
        file=json_out,
        flush=True,
    )


if __name__ == "__main__":
    main()
