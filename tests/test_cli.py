"""`mergeloom` CLI on real safetensors files of a tiny open_clip image tower."""

import pytest
import torch

from mergeloom import vectors
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
    fails_with([tmp_path / "corrupt.safetensors"], "cannot read safetensors file ")
    nan = vectors.load(experts[1])
    nan["proj"][0, 0] = float("inf")
    vectors.save(nan, tmp_path / "nan.safetensors")
    fails_with(
        [experts[0], tmp_path / "nan.safetensors"], "nan.safetensors: tensor 'proj' contains"
    )
    other = vectors.load(experts[1])
    other["proj"] = torch.zeros(3, 3)
    vectors.save(other, tmp_path / "shape.safetensors")
    fails_with([tmp_path / "shape.safetensors"], "proj: (3, 3) vs (16, 8)")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
