"""`mergeloom` CLI on real safetensors files of a tiny open_clip image tower."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mergeloom import cli, methods, vectors, weave
from mergeloom.cli import main, parse_lambdas


@pytest.fixture
def files(tiny_clip, tmp_path):
    """pretrained + 3 experts of a tiny open_clip visual tower, with an int64 buffer."""
    base = {k: v.clone() for k, v in tiny_clip.visual.state_dict().items()}
    base["step_counter"] = torch.tensor(11, dtype=torch.int64)
    vectors.save(base, tmp_path / "pretrained.safetensors")
    experts = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        expert = {
            k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in base.items()
        }
        experts.append(tmp_path / f"expert_{i}.safetensors")
        vectors.save(expert, experts[-1])
    return tmp_path / "pretrained.safetensors", experts


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_methods_lists_every_method_with_defaults(capsys):
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    for name in (
        "weight_averaging",
        "task_arithmetic",
        "ties",
        "dare",
        "breadcrumbs",
        "magmax",
        "random_mix",
        "pcb",
        "tsv_m",
        "iso_c",
        "iso_cts",
        "cart",
        "consensus",
    ):
        assert f"\n{name} " in f"\n{out}"
    assert "lam=1.0, k=0.2, merge='mean', scope='global'" in out
    assert "Scope: global" in out


def test_merge_writes_full_weights_that_load_into_the_model(files, tiny_clip, tmp_path, capsys):
    pretrained, experts = files
    out = tmp_path / "merged.safetensors"
    code, stdout, _ = run_cli(
        [
            "merge",
            "ties",
            "--pretrained",
            pretrained,
            "--experts",
            *experts,
            "--out",
            out,
            "--set",
            "k=0.5",
            "--lam",
            "0.8",
        ],
        capsys,
    )
    assert code == 0 and "wrote" in stdout
    merged = vectors.load(out)
    assert merged["step_counter"].item() == 11  # integer buffer copied unchanged
    del merged["step_counter"]
    tiny_clip.visual.load_state_dict(merged, strict=True)
    meta = vectors.SafetensorsFile(out).metadata
    assert meta["method"] == "ties" and '"k": 0.5' in meta["hyperparameters"]


def test_one_expert_at_lam_one_gives_it_back(files, tmp_path, capsys):
    pretrained, experts = files
    out = tmp_path / "m.safetensors"
    assert (
        run_cli(
            [
                "merge",
                "task_arithmetic",
                "--pretrained",
                pretrained,
                "--experts",
                experts[0],
                "--lam",
                "1",
                "--out",
                out,
            ],
            capsys,
        )[0]
        == 0
    )
    expected = vectors.load(experts[0])
    for key, value in vectors.load(out).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)


def test_weave_records_search_space_and_pool(files, tmp_path, capsys):
    pretrained, experts = files
    out = tmp_path / "w.safetensors"
    code, _, err = run_cli(
        [
            "weave",
            "magmax",
            "--pretrained",
            pretrained,
            "--experts",
            *experts,
            "--lambdas",
            "0.05:1.0:0.05",
            "--pool",
            "random",
            "--seed",
            "4",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    meta = vectors.SafetensorsFile(out).metadata
    assert meta["pool"] == "random" and meta["seed"] == "4" and meta["collaborative"] == "true"
    assert meta["lambdas"].startswith("[0.05, 0.1, 0.15") and meta["lambdas"].endswith("1.0]")


def test_parse_lambdas():
    grid = parse_lambdas("0.05:1.0:0.05")
    assert len(grid) == 20 and grid[0] == 0.05 and grid[-1] == 1.0 and grid[5] == 0.3
    assert parse_lambdas("0.1,0.3") == [0.1, 0.3]
    assert parse_lambdas("0.5:0.5:0.1") == [0.5]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["merge", "tie"], "unknown merge method 'tie'; known: breadcrumbs"),
        (["merge", "ties", "--set", "k=1.5"], "ties: k must be in (0.0, 1.0], got 1.5"),
        (["merge", "ties", "--set", "densty=0.2"], "ties has no hyperparameter ['densty']"),
        (["merge", "ties", "--set", "k"], "--set 'k': expected name=value"),
        (["weave", "ties", "--pool", "median"], "unknown pool 'median'"),
        (["weave", "ties", "--lambdas", "1:0:0.1"], "--lambdas '1:0:0.1': expected start:stop"),
    ],
)
def test_bad_arguments(files, tmp_path, capsys, args, message):
    pretrained, experts = files
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(
        [*args, "--pretrained", pretrained, "--experts", *experts, "--out", out], capsys
    )
    assert code == 2
    assert message in err
    assert not out.exists()


def test_bad_files(files, tmp_path, capsys):
    pretrained, experts = files
    out = tmp_path / "out.safetensors"

    def fails_with(expert_files, message):
        code, _, err = run_cli(
            ["merge", "ties", "--pretrained", pretrained, "--experts", *expert_files, "--out", out],
            capsys,
        )
        assert code == 2 and message in err, err
        assert not out.exists()

    fails_with([tmp_path / "missing.safetensors"], "not found: ")
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    fails_with([tmp_path / "corrupt.safetensors"], "corrupt.safetensors is not a safetensors file")
    nan = vectors.load(experts[1])
    nan["proj"][0, 0] = float("inf")
    safetensors.torch.save_file(nan, tmp_path / "nan.safetensors")  # vectors.save refuses it
    fails_with(
        [experts[0], tmp_path / "nan.safetensors"], "nan.safetensors: tensor 'proj' contains"
    )
    other = vectors.load(experts[1])
    other["proj"] = torch.zeros(3, 3)
    vectors.save(other, tmp_path / "shape.safetensors")
    fails_with([tmp_path / "shape.safetensors"], "proj: (3, 3) vs (16, 8)")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    "command", [["merge", "tsv_m"], ["weave", "ties", "--lambdas", "0.2,0.6", "--pool", "max_abs"]]
)
def test_device_cpu_and_auto_without_cuda_write_the_default_bytes(files, tmp_path, capsys, command):
    """The device is where the math runs, not a result: not recorded, CPU output unchanged."""
    pretrained, experts = files
    outputs = {}
    for device in (None, "cpu", "auto"):
        out = tmp_path / f"{device}.safetensors"
        option = [] if device is None else ["--device", device]
        args = [*command, "--pretrained", pretrained, "--experts", *experts, "--out", out]
        assert run_cli([*args, *option], capsys)[0] == 0
        outputs[device] = out.read_bytes()
    assert outputs["cpu"] == outputs[None]
    if not torch.cuda.is_available():
        assert outputs["auto"] == outputs[None]


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", "--device 'gpu': expected auto, cpu, cuda or cuda:N"),
     ("cuda", "--device 'cuda' asked for, but torch.cuda.is_available() is False")],
)  # fmt: skip
def test_bad_device_is_one_line_exit_2_before_reading(files, tmp_path, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    pretrained, _ = files
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(
        ["merge", "ties", "--pretrained", pretrained, "--experts", tmp_path / "missing",
         "--out", out, "--device", device], capsys,
    )  # fmt: skip
    assert code == 2 and err == f"mergeloom: error: {message}\n"  # before the missing expert
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("command", [["merge", "tsv_m"], ["merge", "ties"],
                                     ["weave", "ties", "--lambdas", "0.2,0.6"]])  # fmt: skip
def test_device_cuda_matches_the_cpu(files, tmp_path, capsys, command):
    pretrained, experts = files
    paths = {d: tmp_path / f"{d}.safetensors" for d in ("cpu", "cuda")}
    for device, out in paths.items():
        args = [*command, "--pretrained", pretrained, "--experts", *experts, "--out", out]
        assert run_cli([*args, "--device", device], capsys)[0] == 0
    cpu, cuda = vectors.SafetensorsFile(paths["cpu"]), vectors.SafetensorsFile(paths["cuda"])
    assert cuda.metadata == cpu.metadata and list(cuda) == list(cpu)
    for key in cpu:
        torch.testing.assert_close(cuda[key], cpu[key], rtol=1e-5, atol=1e-5, msg=key)


# ---------------------------------------------------------------- the installed entry point
# Every option of every subcommand, run as the user runs it (a subprocess of the console
# script), on small safetensors files; outputs are compared with the library called directly.


def entry_point() -> list[str]:
    script = Path(sys.executable).with_name("mergeloom")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mergeloom"]


def mergeloom(*args, check_code: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*entry_point(), *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if check_code is not None:
        assert result.returncode == check_code, result.stderr
    return result


@pytest.fixture
def small(tmp_path):
    """pretrained + 3 experts: two float tensors (a matrix and a bias) and an int64 buffer."""
    g = torch.Generator().manual_seed(0)
    base = {
        "layer.weight": torch.randn(6, 5, generator=g),
        "layer.bias": torch.randn(6, generator=g),
        "steps": torch.tensor([3, 4], dtype=torch.int64),
    }
    vectors.save(base, tmp_path / "pretrained.safetensors")
    experts = []
    for i in range(3):
        expert = {
            k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items() if k != "steps"
        }
        expert["steps"] = base["steps"]
        experts.append(tmp_path / f"expert_{i}.safetensors")
        vectors.save(expert, experts[-1])
    return tmp_path / "pretrained.safetensors", experts


def expected(pretrained, delta) -> dict[str, torch.Tensor]:
    return vectors.apply(vectors.load(pretrained), delta)


def assert_same(path, want) -> None:
    got = vectors.load(path)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def assert_differs(path, other) -> None:
    got = vectors.load(path)
    assert any(not torch.allclose(got[k], other[k]) for k in other if k != "steps")


def test_entry_point_methods_lists_the_registry():
    out = mergeloom("methods").stdout
    for name in methods.METHODS:
        assert f"\n{name} " in f"\n{out}"


def test_entry_point_merge_lam_and_set(small, tmp_path):
    pretrained, experts = small
    out = tmp_path / "sub" / "merged.safetensors"  # --out folder is created
    result = mergeloom(
        "merge", "ties", "--pretrained", pretrained, "--experts", *experts, "--out", out,
        "--lam", "0.8", "--set", "k=0.5", "--set", "merge=sum",
    )  # fmt: skip
    assert result.stdout.strip() == f"wrote {out} (3 tensors)" and result.stderr == ""
    tvs = vectors.load_task_vectors(pretrained, experts)
    want = expected(pretrained, methods.get("ties")(tvs, lam=0.8, k=0.5, merge="sum"))
    assert_same(out, want)
    assert_differs(out, expected(pretrained, methods.get("ties")(tvs, lam=0.8)))
    meta = vectors.SafetensorsFile(out).metadata
    assert meta["method"] == "ties"
    assert json.loads(meta["hyperparameters"]) == {"k": 0.5, "lam": 0.8, "merge": "sum"}
    assert json.loads(meta["experts"]) == [str(p) for p in experts]


def test_entry_point_merge_set_reads_yaml_scalars(small, tmp_path):
    """--set values typed as YAML: float, str, int and bool, for a seeded method."""
    pretrained, experts = small
    out = tmp_path / "dare.safetensors"
    mergeloom(
        "merge", "dare", "--pretrained", pretrained, "--experts", *experts[:2], "--out", out,
        "--set", "p=0.3", "--set", "base=ties", "--set", "seed=7", "--set", "rescale=false",
    )  # fmt: skip
    tvs = vectors.load_task_vectors(pretrained, experts[:2])
    hp = {"p": 0.3, "base": "ties", "seed": 7, "rescale": False}
    assert_same(out, expected(pretrained, methods.get("dare")(tvs, **hp)))
    assert_differs(out, expected(pretrained, methods.get("dare")(tvs, **{**hp, "seed": 8})))


def test_entry_point_weave_set_reaches_the_method(small, tmp_path):
    """The reported crash: weave --set passed the hyperparameters as keywords of weave()."""
    pretrained, experts = small
    out = tmp_path / "woven.safetensors"
    mergeloom(
        "weave", "ties", "--pretrained", pretrained, "--experts", *experts, "--out", out,
        "--set", "k=0.5", "--set", "merge=max", "--lambdas", "0.1,0.5",
    )  # fmt: skip
    tvs = vectors.load_task_vectors(pretrained, experts)
    hp = {"k": 0.5, "merge": "max"}
    want = weave.weave("ties", tvs, {"lam": [0.1, 0.5]}, hyperparameters=hp)
    assert_same(out, expected(pretrained, want))
    assert_differs(out, expected(pretrained, weave.weave("ties", tvs, {"lam": [0.1, 0.5]})))
    meta = vectors.SafetensorsFile(out).metadata
    assert json.loads(meta["hyperparameters"]) == hp and json.loads(meta["lambdas"]) == [0.1, 0.5]


def test_entry_point_weave_defaults(small, tmp_path):
    """Only the required options: lambdas 0.05:1.0:0.05, mean pool, collaborative, seed 0."""
    pretrained, experts = small
    out = tmp_path / "woven.safetensors"
    mergeloom("weave", "magmax", "--pretrained", pretrained, "--experts", *experts, "--out", out)
    tvs = vectors.load_task_vectors(pretrained, experts)
    grid = parse_lambdas("0.05:1.0:0.05")
    want = weave.weave("magmax", tvs, {"lam": grid}, "mean", collaborative=True, seed=0)
    assert_same(out, expected(pretrained, want))
    meta = vectors.SafetensorsFile(out).metadata
    assert meta["pool"] == "mean" and meta["collaborative"] == "true" and meta["seed"] == "0"
    assert float(meta["effective_lam_mean_pool"]) == pytest.approx(sum(grid) / (len(grid) + 3))


def test_entry_point_weave_range_max_abs_pool_no_collaborative(small, tmp_path):
    pretrained, experts = small
    out = tmp_path / "woven.safetensors"
    mergeloom(
        "weave", "task_arithmetic", "--pretrained", pretrained, "--experts", *experts,
        "--out", out, "--lambdas", "0.2:0.6:0.2", "--pool", "max_abs", "--no-collaborative",
    )  # fmt: skip
    tvs = vectors.load_task_vectors(pretrained, experts)
    space = {"lam": [0.2, 0.4, 0.6]}
    want = weave.weave("task_arithmetic", tvs, space, "max_abs", collaborative=False)
    assert_same(out, expected(pretrained, want))
    collaborative = weave.weave("task_arithmetic", tvs, space, "max_abs", collaborative=True)
    assert_differs(out, expected(pretrained, collaborative))
    meta = vectors.SafetensorsFile(out).metadata
    assert meta["collaborative"] == "false" and meta["pool"] == "max_abs"


def test_entry_point_weave_seed_of_the_pool_and_of_the_method(small, tmp_path):
    """--seed seeds the random pool; --set seed=... is the method's own seed (DARE masks)."""
    pretrained, experts = small
    out = tmp_path / "woven.safetensors"
    mergeloom(
        "weave", "dare", "--pretrained", pretrained, "--experts", *experts, "--out", out,
        "--lambdas", "0.3,0.9", "--pool", "random", "--seed", "4", "--set", "seed=7",
    )  # fmt: skip
    tvs = vectors.load_task_vectors(pretrained, experts)

    def woven(pool_seed, method_seed):
        delta = weave.weave(
            "dare", tvs, {"lam": [0.3, 0.9]}, "random", seed=pool_seed,
            hyperparameters={"seed": method_seed},
        )  # fmt: skip
        return expected(pretrained, delta)

    assert_same(out, woven(4, 7))
    assert_differs(out, woven(5, 7))
    assert_differs(out, woven(4, 8))
    assert vectors.SafetensorsFile(out).metadata["seed"] == "4"


def test_entry_point_weave_method_pool_with_pool_set(small, tmp_path):
    pretrained, experts = small
    out = tmp_path / "woven.safetensors"
    mergeloom(
        "weave", "task_arithmetic", "--pretrained", pretrained, "--experts", *experts,
        "--out", out, "--lambdas", "0.1,0.3,0.5", "--pool", "ties", "--pool-set", "k=0.3",
    )  # fmt: skip
    tvs = vectors.load_task_vectors(pretrained, experts)
    space = {"lam": [0.1, 0.3, 0.5]}
    want = weave.weave("task_arithmetic", tvs, space, "ties", pool_hyperparameters={"k": 0.3})
    assert_same(out, expected(pretrained, want))
    assert_differs(out, expected(pretrained, weave.weave("task_arithmetic", tvs, space, "ties")))
    meta = vectors.SafetensorsFile(out).metadata
    assert meta["pool"] == "ties" and json.loads(meta["pool_hyperparameters"]) == {"k": 0.3}


def test_entry_point_python_dash_m_matches_the_script(small, tmp_path):
    pretrained, experts = small
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    args = ["merge", "magmax", "--pretrained", pretrained, "--experts", *experts]
    mergeloom(*args, "--out", a)
    run = subprocess.run(
        [sys.executable, "-m", "mergeloom", *(str(x) for x in args), "--out", str(b)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert a.read_bytes() == b.read_bytes()


def assert_one_error_line(result, code: int, message: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergeloom: error: "), result.stderr
    assert message in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["weave", "ties", "--set", "densty=0.2"],
            "ties has no hyperparameter ['densty']; it takes: lam",
        ),
        (
            ["merge", "ties", "--set", "densty=0.2"],
            "ties has no hyperparameter ['densty']; it takes: lam",
        ),
        (["weave", "ties", "--set", "lam=0.3"], "weave: ['lam'] given both as fixed"),
        (["merge", "ties", "--lam", "0.5", "--set", "lam=0.3"], "lam given twice"),
        (
            ["weave", "ties", "--pool", "ties", "--pool-set", "kk=1"],
            "ties has no hyperparameter ['kk']",
        ),
        (["weave", "ties", "--pool", "ties", "--pool-set", "lam=1"], "a pool's lam is fixed"),
        (["weave", "ties", "--pool", "mean", "--pool-set", "k=0.3"], "pool 'mean' takes no hyper"),
        (["weave", "ties", "--pool", "medain", "--pool-set", "k=1"], "unknown pool 'medain'"),
        (["weave", "ties", "--pool-set", "k"], "--pool-set 'k': expected name=value"),
        (["weave", "ties", "--lambdas", "a,b"], "--lambdas 'a,b': expected start:stop:step"),
        (["weave", "ties", "--set", "k=2"], "ties: k must be in (0.0, 1.0], got 2"),
    ],
)
def test_entry_point_bad_input_is_one_line_exit_2(small, tmp_path, args, message):
    pretrained, experts = small
    out = tmp_path / "out.safetensors"
    result = mergeloom(
        *args, "--pretrained", pretrained, "--experts", *experts, "--out", out, check_code=None
    )
    assert_one_error_line(result, 2, message)
    assert not out.exists()


def test_entry_point_bad_expert_file_is_one_line(small, tmp_path):
    pretrained, experts = small
    (tmp_path / "notes.safetensors").write_text("these are not tensors\n")
    out = tmp_path / "out.safetensors"
    result = mergeloom(
        "weave", "ties", "--pretrained", pretrained, "--experts", experts[0],
        tmp_path / "notes.safetensors", "--out", out, check_code=None,
    )  # fmt: skip
    assert_one_error_line(result, 2, "notes.safetensors is not a safetensors file: it starts")
    assert not out.exists()


def test_entry_point_out_folder_is_refused_up_front(small, tmp_path):
    """--out naming a folder is bad input (exit 2), found before any tensor is read."""
    pretrained, experts = small
    out = tmp_path / "existing_folder"
    out.mkdir()
    result = mergeloom(
        "merge", "ties", "--pretrained", pretrained, "--experts", *experts, "--out", out,
        check_code=None,
    )  # fmt: skip
    assert_one_error_line(result, 2, f"--out {out} is a directory; expected a file path")
    assert list(out.iterdir()) == []  # the temporary file was removed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unexpected_exception_in_process(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(cli, "run", boom)
    assert cli.main(["methods"]) == 1
    err = capsys.readouterr().err
    assert err == "mergeloom: error: RuntimeError: disk on fire second line\n"


def test_entry_point_missing_required_option_is_a_usage_error(small):
    pretrained, experts = small
    result = mergeloom(
        "merge", "ties", "--pretrained", pretrained, "--experts", *experts, check_code=2
    )
    assert "the following arguments are required: --out" in result.stderr
    assert "Traceback" not in result.stderr
