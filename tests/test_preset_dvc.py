"""A preset-shaped pipeline with the real `dvc` CLI: the same stages as the embedded default, on
real dataset files (generated MNIST idx files, an ImageFolder tree, CIFAR-100 pickles) read from a
datasets root outside the repository, a published-weights-style checkpoint, per-task epochs and
the sequential chain. A tiny open_clip config stands in for ViT-B-32.
"""

import json
import shutil
import sys

import torch
import yaml
from fake_data import write_cifar, write_image_folder, write_mnist
from test_pipeline import ROOT, copy_code, dvc, ran, run

from mergeloom import clip, vectors

# torchvision checks the md5 sums of the real CIFAR files; every process of the test (DVC's
# stage commands included) gets the existence-only check of tests/fake_data.no_cifar_checksums.
SITECUSTOMIZE = """
import torchvision.datasets as tvd
for cls in (tvd.CIFAR10, tvd.CIFAR100):
    cls.train_list = [[name, None] for name, _ in cls.train_list]
    cls.test_list = [[name, None] for name, _ in cls.test_list]
    cls.meta = {**cls.meta, "md5": None}
"""


def test_presets_keep_the_protocol_recipe():
    for folder in ("vit-b-32-8tasks", "cifar100-10splits", "domainnet-leave-one-out"):
        p = yaml.safe_load((ROOT / "presets" / folder / "params.yaml").read_text())
        ft = p["finetune"]
        assert (ft["lr"], ft["batch_size"], ft["weight_decay"], ft["grad_clip"]) == (
            1e-5, 128, 0.1, 1.0), folder  # fmt: skip
        assert p["model"] == {"name": "ViT-B-32", "pretrained": "openai"}
    p = yaml.safe_load((ROOT / "presets/vit-b-32-8tasks/params.yaml").read_text())
    assert p["finetune"]["epochs"]["Cars"] == 35 and p["finetune"]["epochs"]["SVHN"] == 4
    p = yaml.safe_load((ROOT / "presets/cifar100-10splits/params.yaml").read_text())
    assert p["setups"]["continual"] == {"dataset": "CIFAR100", "class_order": None, "n_tasks": 10}


def test_a_preset_shaped_pipeline_runs_every_stage_and_reruns_only_what_changed(tmp_path):
    repo, datasets, site = tmp_path / "repo", tmp_path / "datasets", tmp_path / "site"
    copy_code(repo)
    folder = repo / "presets" / "tiny"
    folder.mkdir(parents=True)
    write_mnist(datasets, "MNIST", n_train=40, n_test=20)
    write_image_folder(datasets / "resisc45" / "NWPU-RESISC45", ["a", "b"], 10)
    write_cifar(datasets, 100, n_train=300, n_test=100)
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    torch.manual_seed(0)
    model, _ = clip.load_clip(str(repo / "configs" / "tiny-vit.json"))
    vectors.save(clip.full_state(model), folder / "tiny-clip.safetensors")  # "published" weights

    p = yaml.safe_load((ROOT / "presets" / "vit-b-32-8tasks" / "params.yaml").read_text())
    p["model"] = {"name": "../../configs/tiny-vit.json", "pretrained": "tiny-clip.safetensors"}
    p["setups"] = {
        "multitask": {"dataset": "benchmarks", "tasks": ["MNIST", "RESISC45"]},
        "continual": {"dataset": "CIFAR100", "class_order": None, "n_tasks": 2},
    }
    p["finetune"] |= {
        "epochs": {"MNIST": 1, "RESISC45": 1, "split0": 0.2, "split1": 0.2},
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_steps": 1,
        "checkpoint_every": 1,
    }
    p["merge"]["methods"] = {"task_arithmetic": {"lam": 0.3}, "ties": {"lam": 1.0, "k": 0.2}}
    p["sweep"] = {"lambdas": [0.5, 1.0]}
    p["weave"] |= {"methods": ["ties"], "pools": ["mean"], "lambdas": [0.5, 1.0]}
    (folder / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {"MERGELOOM_DATASETS": str(datasets), "PYTHONPATH": str(site)}

    run(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    run(repo, sys.executable, "-m", "stages.pipeline", "presets/tiny")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "preset")
    stages = ran(dvc(folder, "repro", env=env))
    assert stages == {"check", "pretrain", "heads", "finetune_multitask@MNIST",
                      "finetune_multitask@RESISC45", "finetune_continual@split0",
                      "finetune_continual@split1", "finetune_sequential@split0",
                      "finetune_sequential@split1", "task_vectors", "baselines",
                      "merge@task_arithmetic", "merge@ties", "weave@ties", "analyze@multitask",
                      "analyze@continual", "report"}, stages  # fmt: skip
    merged = json.loads((folder / "metrics/merge/ties.json").read_text())
    assert set(merged) == {"multitask", "continual", "continual_sequential"}
    assert merged["continual"]["all"]["oracle_lam"] in (0.5, 1.0)  # picked on validation
    assert set(merged["continual"]["all"]["oracle"]) == {"all", "split0", "split1"}
    analysis = json.loads((folder / "metrics/analysis/continual.json").read_text())
    assert set(analysis) == {"individual", "sequential", "sequential_increments"}
    assert "continual_sequential" in json.loads((folder / "metrics/summary.json").read_text())
    assert "## continual_sequential" in (folder / "reports/summary.md").read_text()
    assert not list(folder.glob(".resume/*/*.pt"))  # resume checkpoints removed when done
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "results")

    # one task's epochs retrain that expert only
    edited = yaml.safe_load((folder / "params.yaml").read_text())
    edited["finetune"]["epochs"]["MNIST"] = 2
    (folder / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    status = dvc(folder, "status", env=env)
    assert "finetune_multitask@MNIST" in status and "RESISC45" not in status, status
    run(repo, "git", "checkout", "presets/tiny/params.yaml")

    # the datasets root is a runtime setting: moving the data reruns nothing
    shutil.move(datasets, tmp_path / "moved")
    moved = {**env, "MERGELOOM_DATASETS": str(tmp_path / "moved"), "MERGELOOM_NUM_WORKERS": "2"}
    assert "up to date" in dvc(folder, "status", env=moved)

    # a missing datasets root fails at once, naming the path, without a traceback
    heads = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"]["heads"]["cmd"]
    output = run(folder, sys.executable, *heads.split()[1:], check=False, env=env)
    assert f"dataset MNIST not found under {datasets}" in output, output
    assert "Traceback" not in output
