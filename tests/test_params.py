"""params.yaml, dvc.yaml and the stage wiring agree with the library, without running anything."""

import ast
from pathlib import Path

import yaml

from mergeloom import methods, weave
from stages import common, pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_stage_name_lists_match_the_registries():
    # stages/common.py spells the names out so that stages without merges need not import them
    assert list(methods.METHODS) == common.METHOD_NAMES
    assert [*weave.POOLS, *methods.METHODS] == common.POOL_NAMES


def test_committed_params_are_valid_in_every_section():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert common.load_params(*params, path=ROOT / "params.yaml").keys() == params.keys()


def test_committed_dvc_yaml_is_generated_from_committed_params():
    assert (ROOT / "dvc.yaml").read_text() == pipeline.render(ROOT / "params.yaml")


def _mergeloom_imports(path: Path) -> set[str]:
    """mergeloom modules a stage script imports directly (`from mergeloom import x, y`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "mergeloom":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mergeloom."):
            found.add(node.module.split(".")[1])
    return found


def test_every_stage_depends_on_the_library_modules_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        script = ROOT / "stages" / f"{stage['cmd'].split()[2].removeprefix('stages.')}.py"
        for module in _mergeloom_imports(script):
            assert f"mergeloom/{module}.py" in stage["deps"], (name, module)
