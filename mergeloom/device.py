"""Where tensors are computed: a runtime choice (``MERGELOOM_DEVICE``, the CLI's ``--device``),
never a tracked param, since results must not depend on it beyond float rounding.

Training and evaluation take a device argument. Merges, weaving and the analysis are pure
functions of task vectors, so they read the device from a context instead of a keyword (a
``device=`` keyword would look like a merge hyperparameter):

    with compute_on("cuda"):
        delta = methods.get("tsv_m")(task_vectors)   # each key computed on the GPU

Inputs stay where they are (usually lazy on disk) and outputs come back to the CPU one key at a
time, so device memory holds one key of every task, as CPU memory does on the CPU path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_COMPUTE: ContextVar[torch.device | None] = ContextVar("mergeloom_compute", default=None)


def pick_device(name: str = "auto") -> torch.device:
    """Resolve a device name; ``"auto"`` is CUDA when available, else the CPU.

    Raises:
        ValueError: an unknown name, or CUDA asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch.cuda.is_available() is False")
    return device


def compute_device() -> torch.device:
    """The device merges, weaving and the analysis compute on (the CPU unless set)."""
    return _COMPUTE.get() or torch.device("cpu")


@contextmanager
def compute_on(name: str | torch.device) -> Iterator[torch.device]:
    """Compute merges, weaving and the analysis on ``name`` inside the block."""
    device = name if isinstance(name, torch.device) else pick_device(name)
    token = _COMPUTE.set(device)
    try:
        yield device
    finally:
        _COMPUTE.reset(token)
