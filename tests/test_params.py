"""params files, dvc.yaml files and the stage wiring agree with the library, running nothing."""

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
    assert common.runtime() == {"device": "cpu", "num_workers": 3, "eval_batch_size": 256,
                                "datasets_root": tmp_path}  # fmt: skip
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
