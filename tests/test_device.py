"""The compute device of merges and weaving (mergeloom/device.py): choosing the CPU explicitly
changes nothing, bit for bit; on CUDA (marked gpu, skipped without one) every method and weave
pool equals the CPU within float rounding and every merged tensor comes back to the CPU."""

import pytest
import torch
from conftest import vit_like

from mergeloom import methods, vectors
from mergeloom.device import compute_device, compute_on
from mergeloom.weave import weave

ALL = sorted(methods.METHODS)
LAMBDAS = [0.1, 0.4, 0.7, 1.0]
POOLS = ["mean", "random", "max_abs", "ties"]  # the three pools and a method used as one

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def identical(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].device.type == "cpu", key
        assert torch.equal(a[key].view(torch.int32), b[key].view(torch.int32)), key


@pytest.fixture
def lazy_task_vectors(task_vectors, tmp_path):
    """The task vectors as files, read key by key (the stacker's read_into path)."""
    base = vit_like(9)
    vectors.save(base, tmp_path / "base.safetensors")
    paths = [tmp_path / f"e{i}.safetensors" for i in range(len(task_vectors))]
    for path, tv in zip(paths, task_vectors, strict=True):
        vectors.save(vectors.apply(base, tv), path)
    return vectors.load_task_vectors(tmp_path / "base.safetensors", paths)


def test_compute_device_defaults_to_the_cpu_and_nests():
    assert compute_device() == torch.device("cpu")
    with compute_on("cpu") as device:
        assert compute_device() == device == torch.device("cpu")
    assert compute_device() == torch.device("cpu")


@pytest.mark.parametrize("name", ALL)
def test_cpu_merge_is_the_default_bit_for_bit(name, task_vectors, lazy_task_vectors):
    for inputs in (task_vectors, lazy_task_vectors):
        default = methods.get(name)(inputs)
        with compute_on("cpu"):
            identical(methods.get(name)(inputs), default)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pool", POOLS)
def test_cpu_weave_is_the_default_bit_for_bit(name, pool, lazy_task_vectors):
    default = weave(name, lazy_task_vectors, {"lam": LAMBDAS}, pool, seed=1)
    with compute_on("cpu"):
        identical(weave(name, lazy_task_vectors, {"lam": LAMBDAS}, pool, seed=1), default)


def on_cuda_equals_cpu(run):
    expected = run()
    with compute_on("cuda"):
        got = run()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].device.type == "cpu", key
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ALL)
def test_cuda_merge_equals_the_cpu(name, task_vectors, lazy_task_vectors):
    for inputs in (task_vectors, lazy_task_vectors):
        on_cuda_equals_cpu(lambda inputs=inputs: methods.get(name)(inputs))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pool", POOLS)
def test_cuda_weave_equals_the_cpu(name, pool, lazy_task_vectors):
    on_cuda_equals_cpu(lambda: weave(name, lazy_task_vectors, {"lam": LAMBDAS}, pool, seed=1))
