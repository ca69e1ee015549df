"""Presets: the paper's setups validate; the preset runner works end to end on generated files."""

import json
from pathlib import Path

import pytest
import yaml
from fake_data import no_cifar_checksums, write_cifar, write_image_folder, write_mnist

from mergeloom import datasets, vectors
from stages import preset, run_preset

ROOT = Path(__file__).parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def test_the_three_paper_setups_exist_with_the_protocol_recipe():
    names = {p.stem for p in PRESETS}
    assert {"vit-b-32-8tasks", "cifar100-10splits-sequential", "domainnet-leave-one-out"} <= names
    for path in PRESETS:
        p = preset.load(path)
        ft = p["finetune"]
        assert (ft["lr"], ft["batch_size"], ft["weight_decay"], ft["warmup_steps"]) == (
            1e-5,
            128,
            0.1,
            500,
        )
        assert p["model"]["name"] == "ViT-B-32" and p["datasets"]["download"] is False
    eight = preset.load(ROOT / "presets" / "vit-b-32-8tasks.yaml")
    assert tuple(eight["setup"]["tasks"]) == datasets.TASKS_8
    assert eight["finetune"]["epochs"] == {t: datasets.SOURCES[t].epochs for t in datasets.TASKS_8}
    cl = preset.load(ROOT / "presets" / "cifar100-10splits-sequential.yaml")
    assert cl["setup"]["n_tasks"] == 10 and cl["finetune"]["sequential"] is True


def _write(tmp_path, p: dict) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def _tiny(tmp_path, setup: dict, epochs, **finetune) -> dict:
    p = yaml.safe_load((ROOT / "presets" / "vit-b-32-8tasks.yaml").read_text())
    p["model"] = {
        "name": str(ROOT / "configs" / "tiny-vit.json"),
        "pretrained": None,
        "device": "cpu",
    }
    p["datasets"] |= {"root": str(tmp_path / "data"), "num_workers": 0}
    p["setup"] = setup
    p["finetune"] |= {
        "epochs": epochs,
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_steps": 1,
        "checkpoint_every": 1,
        **finetune,
    }
    p["evaluate"]["batch_size"] = 32
    p["merge"] = {"task_arithmetic": {"lam": 0.3}, "ties": {"lam": 1.0, "k": 0.2}}
    p["weave"] = {
        "methods": ["ties"],
        "pools": ["mean"],
        "lambdas": [0.5, 1.0],
        "collaborative": True,
        "seed": 0,
    }
    return p


def test_bad_preset_values_fail_naming_the_key(tmp_path):
    p = _tiny(tmp_path, {"kind": "multitask", "tasks": ["MNIST", "Cars2"]}, 1)
    with pytest.raises(ValueError, match=r"setup.tasks = \['MNIST', 'Cars2'\] is invalid"):
        preset.load(_write(tmp_path, p))
    p = _tiny(tmp_path, {"kind": "multitask", "tasks": ["MNIST"]}, {"Cars": 3})
    with pytest.raises(ValueError, match="finetune.epochs for MNIST = None is invalid"):
        preset.load(_write(tmp_path, p))
    p = _tiny(tmp_path, {"kind": "continual", "dataset": "CIFAR100", "n_tasks": 7}, 1)
    with pytest.raises(ValueError, match=r"setup.n_tasks = 7 is invalid; expected one of \[5"):
        preset.load(_write(tmp_path, p))
    with pytest.raises(ValueError, match="preset file not found"):
        preset.load(tmp_path / "nope.yaml")


def test_multitask_preset_runs_end_to_end_and_resumes_nothing_twice(tmp_path, monkeypatch):
    no_cifar_checksums(monkeypatch)
    write_cifar(tmp_path / "data", 10, n_train=60, n_test=20)
    write_mnist(tmp_path / "data", "MNIST", n_train=40, n_test=20)
    write_image_folder(tmp_path / "data" / "resisc45" / "NWPU-RESISC45", ["a", "b"], 10)
    tasks = ["CIFAR10", "MNIST", "RESISC45"]
    p = _tiny(tmp_path, {"kind": "multitask", "tasks": tasks}, {t: 0.5 for t in tasks})
    out, resume = tmp_path / "run", ["--resume-dir", str(tmp_path / "resume")]
    run_preset.main([str(_write(tmp_path, p)), "--out", str(out), *resume])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["zero_shot"]) == set(tasks)
    assert {n: list(s) for n, s in metrics["experts"].items()} == {t: [t] for t in tasks}
    merged = metrics["merged"]["all"]
    assert set(merged) == {"task_arithmetic", "ties", "weave/ties/mean"}
    assert all(0 <= a <= 1 for scores in merged.values() for a in scores.values())
    assert not list((tmp_path / "resume").glob("*"))  # checkpoints removed after each expert
    steps = vectors.SafetensorsFile(out / "experts" / "MNIST.safetensors").metadata["steps"]
    assert steps == str(round(0.5 * 3))  # 36 train images, batch 16: 3 batches per epoch
    before = (out / "experts" / "MNIST.safetensors").stat().st_mtime_ns
    run_preset.main([str(_write(tmp_path, p)), "--out", str(out), *resume])  # experts reused
    assert (out / "experts" / "MNIST.safetensors").stat().st_mtime_ns == before


def test_continual_and_domain_presets_run_on_generated_files(tmp_path, monkeypatch):
    no_cifar_checksums(monkeypatch)
    write_cifar(tmp_path / "data", 100, n_train=200, n_test=50)
    setup = {"kind": "continual", "dataset": "CIFAR100", "n_tasks": 5}
    p = _tiny(tmp_path, setup, 0.5, sequential=True, checkpoint_every=0)
    p["weave"] = {}
    run_preset.main(
        [
            str(_write(tmp_path, p)),
            "--out",
            str(tmp_path / "cl"),
            "--resume-dir",
            str(tmp_path / "r"),
        ]
    )
    metrics = json.loads((tmp_path / "cl" / "metrics.json").read_text())
    assert list(metrics["zero_shot"]) == ["all"]  # one 100-way head on the full test set
    assert set(metrics["experts"]) == {f"split{t}" for t in range(5)}
    alone = [str(_write(tmp_path, p)), "--out", str(tmp_path / "one"), "--expert"]
    with pytest.raises(ValueError, match="split1 starts from .*split0.safetensors, which is miss"):
        run_preset.main([*alone, "split1"])
    run_preset.main([*alone, "split0", "--resume-dir", str(tmp_path / "r")])
    assert [f.name for f in (tmp_path / "one").rglob("*.*")] == ["split0.safetensors"]
    alone, chained = (
        vectors.load(d / "experts" / "split0.safetensors")
        for d in (tmp_path / "one", tmp_path / "cl")
    )
    assert all(alone[k].equal(chained[k]) for k in chained)  # same seed, same expert

    for d in ("clipart", "real", "sketch"):
        write_image_folder(tmp_path / "dom" / d, ["cat", "dog"], 6)
    setup = {"kind": "domains", "tasks": ["clipart", "real", "sketch"], "test_fraction": 0.2}
    p = _tiny(tmp_path, setup, 0.5, checkpoint_every=0)
    p["datasets"]["root"] = str(tmp_path / "dom")
    p["weave"] = {}
    run_preset.main(
        [
            str(_write(tmp_path, p)),
            "--out",
            str(tmp_path / "dg"),
            "--resume-dir",
            str(tmp_path / "r"),
        ]
    )
    merged = json.loads((tmp_path / "dg" / "metrics.json").read_text())["merged"]
    assert {held: list(m["ties"]) for held, m in merged.items()} == {
        "clipart": ["clipart"],
        "real": ["real"],
        "sketch": ["sketch"],
    }


def test_missing_dataset_fails_before_the_model_loads(tmp_path):
    p = _tiny(tmp_path, {"kind": "multitask", "tasks": ["SVHN"]}, 1)
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="dataset SVHN not found under"):
        run_preset.main([str(_write(tmp_path, p)), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_generated_pipeline_chains_sequential_experts_and_splits_params():
    from stages import preset_pipeline

    text = preset_pipeline.render(
        Path("presets/cifar100-10splits-sequential.yaml"), Path("runs/cl")
    )
    stages = yaml.safe_load(text)["stages"]
    assert list(stages) == [*(f"expert-split{t}" for t in range(10)), "evaluate"]
    assert "runs/cl/experts/split0.safetensors" in stages["expert-split1"]["deps"]
    assert not any("experts" in d for d in stages["expert-split0"]["deps"])
    assert stages["expert-split3"]["outs"] == ["runs/cl/experts/split3.safetensors"]
    assert "--resume-dir .resume/cl --expert split3" in stages["expert-split3"]["cmd"]
    (params,) = stages["expert-split3"]["params"]
    assert "merge" not in params["presets/cifar100-10splits-sequential.yaml"]
    (params,) = stages["evaluate"]["params"]
    assert "finetune" not in params["presets/cifar100-10splits-sequential.yaml"]
    individual = yaml.safe_load(
        preset_pipeline.render(Path("presets/vit-b-32-8tasks.yaml"), Path("runs/mt"))
    )["stages"]
    assert not any("experts" in d for d in individual["expert-DTD"]["deps"])
