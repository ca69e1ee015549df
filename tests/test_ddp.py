"""One expert fine-tuned by 2 processes (gloo on the CPU, as torchrun runs them) equals the
single-process expert up to floating-point reduction order.

Measured (tiny ViT, 21 ImageFolder images, batch 10 so that each epoch ends with a 1-image batch,
6 steps, accumulate 2): max |difference| 1.5e-7 to 8.5e-7, at most 4.1e-6 of each tensor's
largest value. One slice is left out: the bias of the attention keys, whose gradient is zero in
exact arithmetic (softmax ignores a constant added to every logit of a query); it holds rounding
noise only, which AdamW divides by its own square root into steps of about lr, so that slice
differs by up to 1.7e-4 (it does between any two summation orders, one process or several).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fake_data import small_stage_folder, write_image_folder
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "tiny-vit.json"
RTOL = 1e-4  # of each tensor's max |value|; measured up to 4.1e-6, 4.8e-5 on an AVX512 CPU

# One fine-tuning in this process or, under torchrun, as one rank of a gloo process group.
SCRIPT = textwrap.dedent(f"""
    import json, os, sys
    from pathlib import Path
    import torch
    from torchvision.datasets import ImageFolder
    from safetensors.torch import save_file
    from mergeloom import clip, loops, train
    data, out, ckpt = sys.argv[1:4]
    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    model, tokenizer = clip.load_clip("{CONFIG}")
    dataset = ImageFolder(data)
    head = clip.zeroshot_head(model, tokenizer, dataset.classes, ["a photo of {{}}."])
    losses = []
    state = train.finetune(model, head, dataset, transform=loops.transforms(model)[0],
        steps=6, batch_size=10, lr=1e-3, weight_decay=0.1, warmup_steps=2, seed=7,
        device="cpu", accumulate=2, checkpoint=Path(ckpt), checkpoint_every=2,
        log=lambda step, values: losses.append(values["loss"]))
    rank = torch.distributed.get_rank() if "WORLD_SIZE" in os.environ else 0
    save_file(state, f"{{out}}.{{rank}}")
    Path(f"{{out}}.{{rank}}.json").write_text(json.dumps(losses))
""")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "MERGELOOM_DEVICE": "cpu", "MERGELOOM_NUM_WORKERS": "0"}  # fmt: skip


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}"]  # fmt: skip


def _key_bias_free(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the attention-key thirds of ``in_proj_bias`` (zero gradient, see top)."""
    out = {}
    for k, v in state.items():
        if k.endswith("attn.in_proj_bias"):
            q, _, v_ = v.chunk(3)
            v = torch.cat([q, v_])
        out[k] = v
    return out


def _assert_same_expert(single: dict, ddp: dict, start: dict | None = None) -> float:
    """Equal up to reduction order (RTOL per tensor); the largest relative difference."""
    assert single.keys() == ddp.keys()
    worst = 0.0
    for k, a in _key_bias_free(single).items():
        b = _key_bias_free(ddp)[k]
        rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        assert rel <= RTOL, f"{k}: DDP differs from one process by {rel:.2e} of its max"
        worst = max(worst, rel)
    if start is not None:  # training moved the weights far more than the tolerance
        moved = max(float((single[k] - start[k]).abs().max()) for k in single)
        assert moved > 1e-3
    return worst


def test_two_gloo_processes_give_the_single_process_expert(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, ["red", "green", "blue"], per_class=7)  # 21 = 10 + 10 + 1
    args = [str(data), str(tmp_path / "ddp"), str(tmp_path / "resume.pt")]
    single = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(tmp_path / "one"),
                             str(tmp_path / "resume.pt")], env=_env(),
                            capture_output=True, text=True)  # fmt: skip
    assert single.returncode == 0, single.stderr
    script = tmp_path / "ft.py"
    script.write_text(SCRIPT)
    ddp = subprocess.run([*_torchrun(2), str(script), *args], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr
    assert not (tmp_path / "resume.pt").exists()  # rank 0 wrote it and removed it at the end
    one = load_file(tmp_path / "one.0")
    ranks = [load_file(tmp_path / f"ddp.{r}") for r in range(2)]
    for k in one:  # the ranks took the same steps: bit-identical replicas
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    torch.manual_seed(0)
    from mergeloom import clip

    start = clip.image_encoder_state(clip.load_clip(str(CONFIG))[0])
    _assert_same_expert(one, ranks[0], start)
    losses = [json.loads((tmp_path / f"{f}.json").read_text()) for f in ("one.0", "ddp.0", "ddp.1")]
    assert len(losses[0]) == 6 and losses[1] == losses[2]  # every rank logs the global batch's
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]))


def _failing_run(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    (tmp_path / "ft.py").write_text(script)
    data = tmp_path / "data"
    if not data.exists():
        write_image_folder(data, ["red", "green"], per_class=5)
    args = [str(tmp_path / "ft.py"), str(data), str(tmp_path / "x"), str(tmp_path / "r.pt")]
    return subprocess.run([*_torchrun(2), *args], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip


def test_a_failure_on_one_rank_fails_the_run_and_nothing_is_written(tmp_path):
    crash = "def boom(step, values):\n    if step == 2 and os.environ['RANK'] == '1':\n"
    crash += "        raise RuntimeError('rank 1 failed')\nstate = train.finetune("
    result = _failing_run(
        tmp_path,
        SCRIPT.replace("state = train.finetune(", crash).replace(
            'log=lambda step, values: losses.append(values["loss"])', "log=boom"
        ),
    )
    assert result.returncode != 0
    assert "RuntimeError: rank 1 failed" in result.stderr
    assert not list(tmp_path.glob("x*"))  # rank 0 stopped before writing its expert

    split = _failing_run(tmp_path, SCRIPT.replace("batch_size=10", "batch_size=9").replace(
        "accumulate=2", "accumulate=1"))  # fmt: skip
    assert split.returncode != 0
    assert "ValueError: batch_size 9 must be divisible by the 2 processes" in split.stderr
    assert not list(tmp_path.glob("x*"))


def _stage(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=folder, env=_env() | env,
                          capture_output=True, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def stage_folder(tmp_path_factory) -> Path:
    """data, pretrain and heads of the small config, run as the pipeline runs them."""
    folder = small_stage_folder(tmp_path_factory.mktemp("ddp"))
    for args in (["stages.data", "--out", "data"],
                 ["stages.pretrain", "--out", "models/pretrained.safetensors", "--visual-out",
                  "models/visual.safetensors", "--logs", "logs/pretrain", "--data",
                  "data/pretrain.safetensors"],
                 ["stages.heads", "--pretrained", "models/pretrained.safetensors", "--data-dir",
                  "data", "--out", "models/heads"]):  # fmt: skip
        result = _stage(folder, *args)
        assert result.returncode == 0, result.stderr
    return folder


def _finetune(folder: Path, out: str, **env: str) -> subprocess.CompletedProcess:
    return _stage(folder, "stages.finetune", "--unit", "multitask", "--task", "digits", "--init",
                  "models/visual.safetensors", "--pretrained", "models/pretrained.safetensors",
                  "--head", "models/heads/multitask/digits.safetensors", "--data-dir", "data",
                  "--out", out, "--logs", f"logs/{out}", **env)  # fmt: skip


def test_stage_with_two_processes_per_node_goes_through_torchrun(stage_folder):
    single = _finetune(stage_folder, "one.safetensors")
    assert single.returncode == 0, single.stderr
    ddp = _finetune(stage_folder, "two.safetensors", MERGELOOM_NPROC_PER_NODE="2")
    assert ddp.returncode == 0, ddp.stderr
    assert (
        "torch.distributed.run --standalone --nproc-per-node=2 -m stages.finetune --unit"
        in ddp.stderr
    )
    assert (stage_folder / "logs" / "two.safetensors" / "metrics.json").exists()
    start = load_file(stage_folder / "models" / "visual.safetensors")
    _assert_same_expert(load_file(stage_folder / "one.safetensors"),
                        load_file(stage_folder / "two.safetensors"), start)  # fmt: skip
    assert not list(stage_folder.glob(".resume/**/*.pt"))

    bad = _finetune(stage_folder, "three.safetensors", MERGELOOM_NPROC_PER_NODE="3")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: finetune.batch_size 32 must be divisible by MERGELOOM_NPROC_PER_NODE = 3"
    )
    assert not (stage_folder / "three.safetensors").exists()
