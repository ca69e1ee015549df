"""Zero-shot templates come from the pinned fusion-bench package (Task Arithmetic's lists)."""

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from fake_data import write_mnist

from mergeloom import datasets as D
from mergeloom import prompts
from mergeloom.clip import load_clip, zeroshot_head

CONFIG = Path(__file__).parents[1] / "configs" / "tiny-vit.json"


def _package_templates(module: str) -> list:
    """The package's own ``templates`` list (callables), loaded from its installed file."""
    path = metadata.distribution("fusion-bench").locate_file(
        f"fusion_bench/tasks/clip_classification/{module}.py"
    )
    spec = importlib.util.spec_from_file_location(f"_test_fb_{module}", Path(str(path)))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.templates)


def test_every_dataset_takes_the_package_templates():
    assert set(prompts.FUSION_BENCH_MODULES) == set(D.SOURCES)
    for name, module in prompts.FUSION_BENCH_MODULES.items():
        package = _package_templates(module)
        assert prompts.TEMPLATES[name] == tuple(t("{}") for t in package), name
        for c in ("7", "sea or lake", "aquarium_fish"):
            assert [t.format(c) for t in prompts.TEMPLATES[name]] == [t(c) for t in package]
    assert prompts.TEMPLATES["MNIST"] == ('a photo of the number: "{}".',)
    assert prompts.TEMPLATES["SVHN"] == ('a photo of the number: "{}".',)
    assert prompts.TEMPLATES["EuroSAT"][0] == "a centered satellite photo of {}."
    assert len(prompts.TEMPLATES["RESISC45"]) == 18 and len(prompts.TEMPLATES["CIFAR100"]) == 18


def test_templates_are_read_without_importing_fusion_bench():
    assert "fusion_bench" not in sys.modules  # its __init__ would need Lightning, Hydra, ...


def test_unknown_template_module_is_named():
    with pytest.raises(ImportError, match="no template module .*no_such_dataset.py"):
        prompts.benchmark_templates("no_such_dataset")


def test_mnist_task_and_head_use_the_package_templates(tmp_path):
    write_mnist(tmp_path, "MNIST", n_train=20, n_test=10, seed=0)
    task = D.load_task("MNIST", tmp_path)
    package = _package_templates("mnist")
    assert task.templates == prompts.TEMPLATES["MNIST"] == tuple(t("{}") for t in package)
    torch.manual_seed(0)
    model, tokenizer = load_clip(str(CONFIG))  # the tiny config, its vocabulary fits the prompts
    head = zeroshot_head(model, tokenizer, task.classnames, task.templates)
    direct = zeroshot_head(model, tokenizer, task.classnames, package)
    assert torch.equal(head, direct)
    own = zeroshot_head(model, tokenizer, task.classnames, ["an image of the digit {}."])
    assert not torch.allclose(head, own)
