"""State dicts, task vectors and safetensors I/O that never needs a whole model set in memory.

A task vector is any ``Mapping[str, Tensor]``: an in-memory dict, or a lazy view that reads
one key at a time from safetensors files (``TaskVector``). Merge methods only index by key, so
they work on both, and a merge of T ViT-sized experts holds one key of each expert at a time.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

StateDict = dict[str, torch.Tensor]
TensorMap = Mapping[str, torch.Tensor]

_MAX_LISTED = 5


def check_finite(tensor: torch.Tensor, key: str, source: str) -> torch.Tensor:
    """Raise on NaN/Inf. A finite sum proves every entry finite; only then is it cheap."""
    if not tensor.is_floating_point() or torch.isfinite(tensor.sum()):
        return tensor
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{source}: tensor {key!r} contains NaN or Inf")
    return tensor


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """Read-only mapping over one safetensors file; each access reads one tensor.

    Tensors are read with plain file reads rather than safe_open's memory map: pages touched
    through a map stay in the process's RSS until it is closed (a merge of 8 ViT-B experts
    then shows ~4.5 GB) and page faults cost ~3.6 s/GB on these machines, while ``readinto``
    copies from the page cache at memory speed. The header is the format's JSON, validated.
    ``cache_last`` keeps the last tensor read, for a pretrained file that every task vector
    subtracts in turn (callers must not modify returned tensors then).
    """

    def __init__(self, path: str | os.PathLike, cache_last: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"safetensors file not found: {self.path}")
        try:
            self._entries, self._metadata, self._data_start = _read_header(self.path)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read safetensors file {self.path}: {err}") from err
        self._keys = sorted(self._entries)
        self._cache_last = cache_last
        self._last: tuple[str, torch.Tensor] | None = None
        self._checked: set[str] = set()  # keys already found finite: merges read keys repeatedly

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        buffer = bytearray(end - start)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + start)
            if f.readinto(buffer) != len(buffer):
                raise ValueError(f"cannot read safetensors file {self.path}: {key!r} truncated")
        tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        tensor = self._check(tensor.reshape(shape), key)
        if self._cache_last:
            self._last = (key, tensor)
        return tensor

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous float32, the key's shape) with no intermediate buffer."""
        entry = self._entries[key]
        if entry["dtype"] != "F32" or not out.is_contiguous() or out.dtype != torch.float32:
            out.copy_(self[key])
            return
        start, end = entry["data_offsets"]
        if end > start:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self._data_start + start)
                if f.readinto(memoryview(out.reshape(-1).numpy()).cast("B")) != end - start:
                    raise ValueError(f"cannot read safetensors file {self.path}: {key!r} truncated")
        self._check(out, key)

    def _check(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        if key not in self._checked:
            check_finite(tensor, key, str(self.path))
            self._checked.add(key)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> str:
        return self._entries[key]["dtype"]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)


def _read_header(path: Path) -> tuple[dict, dict[str, str], int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= size - 8:
            raise ValueError(f"header length {length} does not fit a file of {size} bytes")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None) or {}
    for key, entry in header.items():
        start, end = entry["data_offsets"]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{key!r} has unsupported dtype {entry['dtype']}")
        numel = math.prod(entry["shape"])
        if (
            not 0 <= start <= end <= size - 8 - length
            or end - start != numel * _DTYPES[entry["dtype"]].itemsize
        ):
            raise ValueError(f"{key!r} has data offsets {entry['data_offsets']} that do not fit")
    return header, metadata, 8 + length


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

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """tau[key] written into ``out`` in place: merges stack T task vectors per key."""
        fill = getattr(self.expert, "read_into", None)
        if fill is None:
            out.copy_(self.expert[key])
        else:
            fill(key, out)
        out.sub_(self.pretrained[key])

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
    base = SafetensorsFile(pretrained, cache_last=True)
    return [TaskVector(SafetensorsFile(p), base, name=str(p)) for p in experts]


def save(
    state: TensorMap, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write atomically: a temporary file in the target folder, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write(f, state, metadata or {})
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_readable(path: str | os.PathLike) -> None:
    """mkstemp creates 0600 files; give the renamed result the permissions open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write(f: BinaryIO, state: TensorMap, metadata: Mapping[str, str]) -> None:
    """The safetensors layout, streamed tensor by tensor (safetensors' own save_file first
    copies every tensor to bytes, doubling peak memory). Sorted keys, no timestamps: the
    same tensors always give the same bytes, so DVC sees unchanged outputs as unchanged."""
    codes = {dtype: code for code, dtype in _DTYPES.items()}
    header: dict[str, object] = {}
    offset = 0
    for key in sorted(state):
        tensor = state[key]
        if tensor.dtype not in codes:
            raise ValueError(f"cannot save {key!r}: unsupported dtype {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": codes[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    f.write(len(blob).to_bytes(8, "little") + blob)
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        if tensor.numel():
            f.write(memoryview(tensor.view(torch.uint8).numpy()))


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
