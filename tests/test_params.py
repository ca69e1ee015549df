"""params files, dvc.yaml files and the stage wiring agree with the library, running nothing."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from stages import common, pipeline

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.parent for p in (ROOT / "presets").glob("*/params.yaml"))


def test_committed_dvc_yaml_is_generated_from_committed_params():
    assert (ROOT / "dvc.yaml").read_text() == pipeline.render(ROOT)


@pytest.mark.parametrize("folder", PRESETS, ids=lambda p: p.name)
def test_every_preset_is_valid_and_gets_the_same_stages(folder):
    """A preset's dvc.yaml is written by `make pipeline PIPELINE=presets/<name>` (not committed
    before a preset has run: DVC would list its never-run stages in every `dvc status`)."""
    pipeline.validate(common.read_params(folder / "params.yaml"))
    stages = yaml.safe_load(pipeline.render(folder).split("\n", 2)[2])["stages"]
    embedded = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {"pretrain", "heads", "task_vectors", "baselines", "merge", "weave", "analyze",
            "report"} <= set(stages) <= set(embedded)  # fmt: skip
    for name, stage in stages.items():  # same scripts, code deps one folder level up
        cmd = stage.get("do", stage)["cmd"].split()[2]
        assert cmd == embedded[name].get("do", embedded[name])["cmd"].split()[2]
        assert stage.get("do", stage)["deps"][0].startswith("../../")


def test_code_deps_are_the_modules_each_stage_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        script = stage["cmd"].split()[2]
        code = [d for d in stage["deps"] if d.endswith(".py")]
        assert code == pipeline.imported_modules(script), name


def test_no_module_every_stage_imports_holds_the_method_or_pool_names():
    """Adding a method must not rerun fine-tuning: finetune imports neither registry."""
    finetune = pipeline.imported_modules("stages.finetune")
    assert "mergeloom/methods.py" not in finetune and "mergeloom/weave.py" not in finetune
    assert "mergeloom/evaluate.py" not in finetune and "stages/pipeline.py" not in finetune
    every = set.intersection(*(set(pipeline.imported_modules(f"stages.{s}")) for s in (
        "data", "pretrain", "heads", "finetune", "task_vectors", "baselines", "merge", "weave",
        "analyze", "report")))  # fmt: skip
    # params wiring, safetensors I/O and the Task type: nothing that grows with methods or tasks
    assert every == {
        "stages/common.py",
        "mergeloom/vectors.py",
        "mergeloom/tasks.py",
        "mergeloom/__init__.py",
        "mergeloom/yamlio.py",
        "stages/__init__.py",
    }, every


def test_imports_are_followed_through_library_modules():
    merge = pipeline.imported_modules("stages.merge")
    assert {"mergeloom/methods.py", "mergeloom/stats.py", "mergeloom/scoring.py",
            "mergeloom/evaluate.py", "stages/merge.py"} <= set(merge)  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["finetune"].update(steps=0),
         "params.yaml: finetune.steps = 0 is invalid; expected an integer >= 1"),
        (lambda p: p["finetune"].update(lr="1e-3"),
         "params.yaml: finetune.lr = '1e-3' is invalid; expected a number > 0"),
        (lambda p: p["finetune"].update(epochs=3),
         "finetune needs exactly one of 'steps' and 'epochs'"),
        (lambda p: p["finetune"].update(learning_rate=1),
         "params.yaml: unknown key finetune.learning_rate"),
        (lambda p: p.update(evaluate={"batch_size": 4}), "unknown section 'evaluate'"),
        (lambda p: p["setups"]["multitask"].update(tasks=["digits", "sudoku"]),
         "params.yaml: setups.multitask.tasks = ['digits', 'sudoku'] is invalid; expected a list"),
        (lambda p: p["setups"]["continual"].update(n_tasks=11),
         "setups.continual.n_tasks = 11 is invalid; expected 2..10"),
        (lambda p: p["weave"].update(pools=["median"]),
         "params.yaml: weave.pools = ['median'] is invalid"),
        (lambda p: p["merge"]["methods"].update(ties={"densty": 0.2}),
         "params.yaml: merge.methods.ties: got an unexpected keyword argument 'densty'"),
        (lambda p: p["merge"]["methods"].update(sudoku={}),
         "params.yaml: merge.methods.sudoku: unknown method 'sudoku'"),
        (lambda p: p["weave"].update(methods=["magmax", "magmax"]),
         "params.yaml: weave.methods = ['magmax', 'magmax'] is invalid"),
        (lambda p: p["weave"].update(methods=[]), "params.yaml: weave.methods = [] is invalid"),
        (lambda p: p["merge"]["methods"].update(ties={"k": 0}),
         "params.yaml: merge.methods.ties: k must be in (0.0, 1.0], got 0"),
        (lambda p: p["merge"]["methods"].update(ties={"k": "abc"}),
         "params.yaml: merge.methods.ties: k must be in (0.0, 1.0], got 'abc'"),
        (lambda p: p["merge"]["methods"].update(task_arithmetic={"lam": 1e39}),
         "params.yaml: merge.methods.task_arithmetic.lam: 1e+39 is invalid; expected a number "
         "in [0, 100]"),
        (lambda p: p["sweep"].update(lambdas=[0.5, -0.5]),
         "params.yaml: sweep.lambdas: -0.5 is invalid; expected a number in [0, 100]"),
        (lambda p: p["weave"].update(lambdas=[1e39, 1.0]), "params.yaml: weave.lambdas: 1e+39"),
        (lambda p: p["weave"].update(lambdas=[0.001 * i for i in range(1001)]),
         "params.yaml: weave.lambdas has 1001 values; expected at most 1000"),
        (lambda p: p["weave"].update(pool_hyperparameters={"ties": {"k": 2}}),
         "params.yaml: weave.pool_hyperparameters.ties: k must be in (0.0, 1.0], got 2"),
        (lambda p: p.update(model="ViT-B-32"), "params.yaml: model = 'ViT-B-32' is invalid"),
        (lambda p: p.update(setups=5), "params.yaml: setups = 5 is invalid"),
        (lambda p: p["finetune"].update(lr=[]), "params.yaml: finetune.lr = [] is invalid"),
    ],
)  # fmt: skip
def test_bad_params_name_the_key_the_value_and_what_is_allowed(edit, message):
    params = common.read_params(ROOT / "params.yaml")
    edit(params)
    with pytest.raises(ValueError) as err:
        pipeline.validate(params)
    assert message in str(err.value)


def test_runtime_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGELOOM_DEVICE", "cpu")
    monkeypatch.setenv("MERGELOOM_NUM_WORKERS", "3")
    monkeypatch.setenv("MERGELOOM_DATASETS", str(tmp_path))
    monkeypatch.delenv("MERGELOOM_NPROC_PER_NODE", raising=False)
    assert common.runtime() == {"device": "cpu", "num_workers": 3, "eval_batch_size": 256,
                                "nproc_per_node": 1, "datasets_root": tmp_path}  # fmt: skip
    monkeypatch.setenv("MERGELOOM_NPROC_PER_NODE", "2")
    assert common.runtime()["nproc_per_node"] == 2
    monkeypatch.setenv("MERGELOOM_NPROC_PER_NODE", "0")
    with pytest.raises(ValueError, match="MERGELOOM_NPROC_PER_NODE = '0' is invalid"):
        common.runtime()
    monkeypatch.setenv("MERGELOOM_NPROC_PER_NODE", "1")
    monkeypatch.setenv("MERGELOOM_EVAL_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="MERGELOOM_EVAL_BATCH_SIZE = '0' is invalid"):
        common.runtime()


def test_default_datasets_root_is_outside_every_dvc_output(monkeypatch):
    monkeypatch.delenv("MERGELOOM_DATASETS", raising=False)
    root = common.runtime()["datasets_root"]
    assert root == ROOT / "datasets"
    for folder in [ROOT, *PRESETS]:
        stages = yaml.safe_load(pipeline.render(folder).split("\n", 2)[2])["stages"]
        for stage in stages.values():
            for out in stage.get("do", stage).get("outs", []):
                path = (folder / (out if isinstance(out, str) else next(iter(out)))).resolve()
                assert root not in (path, *path.parents) and path not in root.parents


def test_params_are_read_as_dvc_reads_them(tmp_path):
    """YAML 1.2, like DVC: `lr: 1e-3` is a number (PyYAML alone reads the string '1e-3')."""
    text = (ROOT / "params.yaml").read_text().replace("  lr: ", "  lr: 1e-3 #", 1)
    (tmp_path / "params.yaml").write_text(text)
    params = common.read_params(tmp_path / "params.yaml")
    assert 0.001 in (params["finetune"]["lr"], params["pretrain"]["lr"])
    pipeline.validate(params)


def _make_pipeline(folder: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`make pipeline PIPELINE=folder`, as a user runs it before `dvc repro`."""
    full = {**os.environ, **(env or {})}
    return subprocess.run(["make", "-s", "-C", str(ROOT), "pipeline", f"PIPELINE={folder}"],
                          env=full, capture_output=True, text=True)  # fmt: skip


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {name: [unclosed\n", "params.yaml is not valid YAML"),
        ("model: ViT-B-32\n", "params.yaml: model = 'ViT-B-32' is invalid"),
        ("- a list\n", "expected a mapping of sections, got list"),
    ],
)
def test_make_pipeline_names_a_broken_params_file_in_one_line(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    assert message in _one_line_error(_make_pipeline(tmp_path))
    assert not (tmp_path / "dvc.yaml").exists()


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("setups", 5, "params.yaml: setups = 5 is invalid; expected a non-empty mapping"),
        ("setups", {"multitask": {"dataset": "imagenet", "tasks": ["a"]}},
         "params.yaml: setups.multitask.dataset = 'imagenet' is invalid"),
        ("model", {"name": "ViT-B-32"}, "params.yaml: missing key model.'pretrained'"),
    ],
)  # fmt: skip
def test_make_pipeline_names_bad_setups_and_model_values_in_one_line(
    tmp_path, section, value, message
):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params[section] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert message in _one_line_error(_make_pipeline(tmp_path))


@pytest.mark.parametrize("where", ["data/user_datasets", "models/heads", "."])
def test_make_pipeline_refuses_datasets_inside_or_around_an_output(tmp_path, where):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    user = (tmp_path / where).resolve()
    user.mkdir(parents=True, exist_ok=True)
    (user / "mine.txt").write_text("a dataset DVC must not delete")
    line = _one_line_error(_make_pipeline(tmp_path, {"MERGELOOM_DATASETS": str(user)}))
    assert f"MERGELOOM_DATASETS = {str(user)!r} overlaps the DVC output" in line
    assert (user / "mine.txt").read_text() == "a dataset DVC must not delete"


def test_published_weights_inside_an_output_are_refused(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["pretrained"] = "models/pretrained.safetensors"  # the pretrain stage's out
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "models").mkdir()
    (tmp_path / "models/pretrained.safetensors").write_bytes(b"weights of the user")
    line = _one_line_error(_make_pipeline(tmp_path))
    assert "model.pretrained" in line and "overlaps the DVC output" in line
