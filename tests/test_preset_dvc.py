"""A preset's generated DVC pipeline, with the real `dvc` CLI in a temporary git repo.

Tiny model and generated MNIST/ImageFolder files stand in for ViT-B-32 and the real datasets;
the pipeline file, commands and params wiring are the ones a real preset gets.
"""

import json
import shutil
import sys

import pytest
import yaml
from fake_data import write_image_folder, write_mnist
from test_pipeline import ROOT, dvc, ran, run

COPIED = ["mergeloom", "stages", "configs", ".dvcignore", "pyproject.toml"]


@pytest.mark.slow
def test_preset_pipeline_caches_experts_and_reruns_only_what_changed(tmp_path):
    repo = tmp_path / "repo"
    for name in COPIED:
        source, target = ROOT / name, repo / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    write_mnist(repo / "data", "MNIST", n_train=40, n_test=20)
    write_image_folder(repo / "data" / "resisc45" / "NWPU-RESISC45", ["a", "b"], 10)
    p = yaml.safe_load((ROOT / "presets" / "vit-b-32-8tasks.yaml").read_text())
    p["model"] = {"name": "configs/tiny-vit.json", "pretrained": None, "device": "cpu"}
    p["datasets"] |= {"root": "data", "num_workers": 0}
    p["setup"]["tasks"] = ["MNIST", "RESISC45"]
    p["finetune"] |= {"epochs": 0.5, "batch_size": 16, "lr": 1e-3, "warmup_steps": 1}
    p["merge"] = {"task_arithmetic": {"lam": 0.3}, "ties": {"lam": 1.0, "k": 0.2}}
    p["weave"] = {
        "methods": ["ties"],
        "pools": ["mean"],
        "lambdas": [0.5, 1.0],
        "collaborative": True,
        "seed": 0,
    }
    (repo / "presets").mkdir()
    (repo / "presets" / "tiny.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (repo / ".gitignore").write_text("/data\n/.resume\n")
    run(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    run(
        repo,
        sys.executable,
        "-m",
        "stages.preset_pipeline",
        "presets/tiny.yaml",
        "--out",
        "runs/tiny",
    )
    pipeline = "runs/tiny/dvc.yaml"
    experts = {f"{pipeline}:expert-MNIST", f"{pipeline}:expert-RESISC45"}
    evaluate = {f"{pipeline}:evaluate"}

    first = dvc(repo, "repro", pipeline)
    assert ran(first) == experts | evaluate
    metrics = json.loads((repo / "runs" / "tiny" / "metrics.json").read_text())
    assert set(metrics["merged"]["all"]) == {"task_arithmetic", "ties", "weave/ties/mean"}
    assert not list((repo / ".resume").rglob("*.pt"))

    p["merge"]["ties"]["k"] = 0.1  # a merge hyperparameter: experts stay cached
    (repo / "presets" / "tiny.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert ran(dvc(repo, "repro", pipeline)) == evaluate

    p["finetune"]["lr"] = 2e-3  # a training hyperparameter: every expert, then evaluation
    (repo / "presets" / "tiny.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert ran(dvc(repo, "repro", pipeline)) == experts | evaluate
