"""State dicts, task vectors and safetensors I/O that never needs a whole model set in memory.

A task vector is any ``Mapping[str, Tensor]``: an in-memory dict, or a lazy view that reads
one key at a time from safetensors files (``TaskVector``). Merge methods only index by key, so
they work on both, and a merge of T ViT-sized experts holds one key of each expert at a time.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]
TensorMap = Mapping[str, torch.Tensor]

_MAX_LISTED = 5


def is_floating(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point()


def check_finite(tensor: torch.Tensor, key: str, source: str) -> torch.Tensor:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{source}: tensor {key!r} contains NaN or Inf")
    return tensor


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """Read-only mapping over one safetensors file; each access reads one tensor (mmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"safetensors file not found: {self.path}")
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            self._keys = sorted(self._handle.keys())
            self._key_set = set(self._keys)
            self._metadata = self._handle.metadata() or {}
        except Exception as err:  # safetensors raises several error types for corrupt files
            raise ValueError(f"cannot read safetensors file {self.path}: {err}") from err

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return check_finite(self._handle.get_tensor(key), key, str(self.path))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handle.get_slice(key).get_dtype()

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def floating_keys(state: TensorMap) -> list[str]:
    """Keys of floating tensors; integer and bool buffers are never merged."""
    if isinstance(state, SafetensorsFile):
        return [k for k in state if state.dtype(k) in _FLOAT_DTYPES]
    return [k for k in state if state[k].is_floating_point()]


def shape_of(state: TensorMap, key: str) -> tuple[int, ...]:
    shape = getattr(state, "shape", None)
    if callable(shape):
        return tuple(shape(key))
    return tuple(state[key].shape)


class TaskVector(Mapping[str, torch.Tensor]):
    """Lazy tau = expert - pretrained over floating keys, in float32, one key per access."""

    def __init__(self, expert: TensorMap, pretrained: TensorMap, name: str = "expert"):
        check_compatible([pretrained, expert], names=["pretrained", name])
        self.expert, self.pretrained, self.name = expert, pretrained, name
        self._keys = floating_keys(pretrained)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self.expert[key].float() - self.pretrained[key].float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return shape_of(self.pretrained, key)


def check_compatible(states: Sequence[TensorMap], names: Sequence[str] | None = None) -> None:
    """Raise if the states differ in keys or shapes, listing up to five offending keys."""
    if not states:
        raise ValueError("expected at least one state dict, got none")
    names = list(names) if names is not None else [f"#{i}" for i in range(len(states))]
    ref_keys = set(states[0])
    for state, name in zip(states[1:], names[1:], strict=True):
        keys = set(state)
        if keys != ref_keys:
            missing = sorted(ref_keys - keys)[:_MAX_LISTED]
            extra = sorted(keys - ref_keys)[:_MAX_LISTED]
            raise ValueError(
                f"{name} has different keys from {names[0]}: missing {missing}, unexpected {extra}"
            )
        bad = [
            f"{k}: {shape_of(state, k)} vs {shape_of(states[0], k)}"
            for k in sorted(ref_keys)
            if shape_of(state, k) != shape_of(states[0], k)
        ]
        if bad:
            listed = "; ".join(bad[:_MAX_LISTED])
            raise ValueError(f"{name} has {len(bad)} shape mismatch(es) with {names[0]}: {listed}")


def subtract(a: TensorMap, b: TensorMap) -> StateDict:
    """a - b over floating keys, in float32."""
    check_compatible([a, b])
    return {k: a[k].float() - b[k].float() for k in floating_keys(a)}


def add(a: TensorMap, b: TensorMap) -> StateDict:
    check_compatible([a, b])
    return {k: a[k].float() + b[k].float() for k in a}


def scale(state: TensorMap, factor: float) -> StateDict:
    return {k: v * factor for k, v in state.items()}


def apply(pretrained: TensorMap, delta: StateDict, inplace: bool = False) -> StateDict:
    """theta_0 + delta in theta_0's dtypes; keys absent from delta (int buffers) are copied.

    With ``inplace`` the entries of ``delta`` are replaced one by one, so adding a merged
    delta to a ViT never holds two full copies.
    """
    extra = sorted(set(delta) - set(pretrained))
    if extra:
        raise ValueError(
            f"delta has keys absent from the pretrained weights: {extra[:_MAX_LISTED]}"
        )
    out = delta if inplace else {}
    for key in pretrained:
        base = pretrained[key]
        if key in delta:
            out[key] = (base.float() + delta[key]).to(base.dtype)
        else:
            out[key] = base.clone()
    return out


def load(path: str | os.PathLike) -> StateDict:
    """Read a whole safetensors file into memory (small files, tests)."""
    source = SafetensorsFile(path)
    return {k: source[k] for k in source}


def load_task_vectors(
    pretrained: str | os.PathLike, experts: Sequence[str | os.PathLike]
) -> list[TaskVector]:
    """Lazy task vectors of expert files against one pretrained file, checked up front."""
    if not experts:
        raise ValueError("expected at least one expert file, got none")
    base = SafetensorsFile(pretrained)
    return [TaskVector(SafetensorsFile(p), base, name=str(p)) for p in experts]


def save(
    state: TensorMap, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write atomically: a temporary file in the target folder, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def metadata_json(values: Mapping[str, object]) -> dict[str, str]:
    """safetensors metadata must be str -> str; nested values are stored as sorted JSON."""
    return {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()
    }


def cosine_similarity(task_vectors: Sequence[TensorMap]) -> torch.Tensor:
    """(T, T) cosine similarity over the concatenated vectors, accumulated in float64."""
    check_compatible(task_vectors)
    n = len(task_vectors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for key in task_vectors[0]:
        stack = torch.stack([tv[key].double().flatten() for tv in task_vectors])  # (T, numel)
        gram += stack @ stack.T
    norms = gram.diagonal().sqrt().clamp(min=torch.finfo(torch.float64).tiny)
    return gram / norms[:, None] / norms[None, :]
