"""State dicts, task vectors and safetensors I/O that never needs a whole model set in memory.

A task vector is any ``Mapping[str, Tensor]``: an in-memory dict, or a lazy view that reads
one key at a time from safetensors files (``TaskVector``). Merge methods only index by key, so
they work on both, and a merge of T ViT-sized experts holds one key of each expert at a time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

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

    The header is the format's JSON, validated here first, so a file that is not safetensors
    fails with one line that says what it is. A tensor is then read by the safetensors library
    with ``pread`` (``backend="pread"``), not its default memory map: pages touched through a
    map stay in the process's RSS until it is closed (a merge of 8 ViT-B experts then shows
    ~4.5 GB). ``read_into`` reads straight into the caller's buffer, which the library cannot
    do (bench/io_bench.py measures both against the library).
    ``cache_last`` keeps the last tensor read, for a pretrained file that every task vector
    subtracts in turn (callers must not modify returned tensors then).
    """

    def __init__(self, path: str | os.PathLike, cache_last: bool = False):
        if not os.fspath(path):
            raise ValueError("safetensors file path is empty; expected a .safetensors file")
        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(f"safetensors file not found: {self.path}")
        if not self.path.is_file():
            kind = file_kind(self.path)
            raise ValueError(f"{self.path} is {kind}, expected a .safetensors file")
        try:
            self._entries, self._metadata, self._data_start = _read_header(self.path)
        except NotSafetensors as err:
            raise ValueError(f"{self.path} is not a safetensors file: {err}") from None
        except ValueError as err:  # includes JSON and UTF-8 decoding errors
            raise ValueError(f"cannot read safetensors file {self.path}: {err}") from None
        except RecursionError:  # json's decoder on '{"a":{"a":...' nested 100k deep
            raise ValueError(
                f"cannot read safetensors file {self.path}: its header JSON is nested too deeply"
            ) from None
        try:
            self._reader = safe_open(self.path, framework="pt", backend="pread")
        except SafetensorError as err:  # what our checks let through: overlapping tensors...
            raise ValueError(f"cannot read safetensors file {self.path}: {err}") from None
        self._keys = sorted(self._entries)
        self._cache_last = cache_last
        self._last: tuple[str, torch.Tensor] | None = None
        self._checked: set[str] = set()  # keys already found finite: merges read keys repeatedly

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if key not in self._entries:
            raise KeyError(key)
        try:
            tensor = self._check(self._reader.get_tensor(key), key)
        except SafetensorError as err:  # e.g. the file was truncated after it was opened
            raise ValueError(f"cannot read safetensors file {self.path}: {key!r}: {err}") from None
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


class NotSafetensors(ValueError):
    """The file is some other format (a PyTorch checkpoint, text...): say which, not why the
    bytes fail as a header."""


# The safetensors library's own limit: a larger "header" is garbage, not worth reading.
_MAX_HEADER = 100_000_000
_CONVERT = "convert it with safetensors.torch.save_file(torch.load(path, weights_only=True), out)"


def _sniff(head: bytes, size: int) -> str | None:
    """Why a file starting with ``head`` (9 bytes) of ``size`` bytes is not safetensors, or
    None. Only the first bytes are looked at: nothing is ever unpickled."""
    length = int.from_bytes(head[:8], "little")
    fits = len(head) >= 8 and 0 < length <= size - 8
    if fits and head[8:9] == b"{":  # the header JSON is an object: the cheap positive test
        return None
    if size == 0:
        return "it is empty"
    if head.startswith(b"PK\x03\x04"):
        return f"it is a zip archive (a PyTorch checkpoint? {_CONVERT})"
    if head.startswith(b"\x80"):
        return f"it looks like a pickle (a legacy PyTorch checkpoint? {_CONVERT})"
    if all(32 <= b < 127 or b in b"\t\n\r" for b in head[:8]):
        return f"it starts with text ({head[:8].decode()!r})"
    if len(head) < 8:
        return f"it has {size} bytes, fewer than the 8-byte header length"
    if not fits:
        return f"its 8-byte header length {length} does not fit a file of {size} bytes"
    return None  # a fitting length without '{': the header check names what it found


def _read_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """Entries, metadata and data start; ValueError naming what is wrong with the header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        reason = _sniff(head, size)
        if reason:
            raise NotSafetensors(reason)
        length = int.from_bytes(head[:8], "little")
        if length > _MAX_HEADER:
            raise ValueError(f"its header length {length} exceeds {_MAX_HEADER} bytes")
        f.seek(8)
        text = f.read(length)
    if not text.startswith(b"{"):
        raise ValueError(f"its header does not start with '{{' (a JSON object): {text[:20]!r}")
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {_json_type(header)}, expected an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"__metadata__ is {_short(metadata)}; expected an object of strings")
    for key, entry in header.items():
        _check_entry(key, entry, size - 8 - length)
    _check_layout(header, size - 8 - length)
    return header, metadata, 8 + length


def _check_entry(key: str, entry: object, data_size: int) -> None:
    """One tensor of the header: {"dtype": code, "shape": [n >= 0], "data_offsets": [a, b]}."""
    if not isinstance(entry, dict):
        raise ValueError(
            f"{key!r} is a JSON {_json_type(entry)}, "
            "expected an object with dtype, shape and data_offsets"
        )
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"{key!r} has dtype {_short(dtype)}; expected one of {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise ValueError(f"{key!r} has shape {_short(shape)}; expected a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise ValueError(
            f"{key!r} has data_offsets {_short(offsets)}; expected [start, end] integers"
        )
    start, end = offsets
    if (
        not 0 <= start <= end <= data_size
        or end - start != math.prod(shape) * _DTYPES[dtype].itemsize
    ):
        raise ValueError(
            f"{key!r} has data offsets {offsets} that do not fit {dtype} of shape {shape} "
            f"in {data_size} data bytes"
        )


def _check_layout(header: Mapping[str, dict], data_size: int) -> None:
    """The tensors fill the data section in order, without gaps, overlaps or trailing bytes,
    as the format (and the library's reader) requires."""
    end = 0
    for key, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        start, stop = entry["data_offsets"]
        if start != end:
            raise ValueError(
                f"{key!r} has data offsets {entry['data_offsets']} where {end} was expected: "
                "tensors must fill the data section in order, without gaps or overlaps"
            )
        end = stop
    if end != data_size:
        raise ValueError(f"its tensors fill {end} of its {data_size} data bytes; expected all")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _short(value: object, limit: int = 60) -> str:
    """repr cut to one short line: a crafted header may hold a million-element list."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_kind(path: Path) -> str:
    """What an existing non-regular path is, for messages ("a directory", "a fifo", ...)."""
    mode = path.stat().st_mode
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


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


_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def dtype_kind(state: TensorMap, key: str) -> tuple[str, bool] | None:
    """(dtype code, is floating) of a key, or None for a lazy view (a weave candidate) that
    would have to compute the tensor to tell: checks must stay cheap."""
    code = getattr(state, "dtype", None)
    if callable(code):
        name = code(key)
        return name, name in _FLOAT_DTYPES
    if isinstance(state, dict):
        dtype = state[key].dtype
        return _CODES.get(dtype, str(dtype).removeprefix("torch.")), dtype.is_floating_point
    return None


class TaskVector(Mapping[str, torch.Tensor]):
    """Lazy tau = expert - pretrained over floating keys, in float32, one key per access."""

    def __init__(
        self,
        expert: TensorMap,
        pretrained: TensorMap,
        name: str = "expert",
        pretrained_name: str = "pretrained",
    ):
        check_compatible([pretrained, expert], names=[pretrained_name, name])
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

    def dtype(self, key: str) -> str:
        """Always float32, whatever the files store: merges never read the values to tell."""
        return "F32"


def check_compatible(states: Sequence[TensorMap], names: Sequence[str] | None = None) -> None:
    """Raise if the states differ in keys, shapes or floating-ness (an expert stored as
    integers would be cast silently, an integer pretrained makes the merge a no-op)."""
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
        _check_floating(state, states[0], name, names[0])


def _check_floating(state: TensorMap, ref: TensorMap, name: str, ref_name: str) -> None:
    """F16 vs F32 is fine (merges work in float32); floating vs integer is not."""
    bad = []
    for key in sorted(ref):
        kind, ref_kind = dtype_kind(state, key), dtype_kind(ref, key)
        if kind and ref_kind and kind[1] != ref_kind[1]:
            bad.append(f"{key!r} is {kind[0]} but {ref_kind[0]}")
    if bad:
        more = f" (and {len(bad) - 1} more key(s))" if len(bad) > 1 else ""
        raise ValueError(
            f"{name}: {bad[0]} in {ref_name}{more}; a key must be floating in every file or in none"
        )


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
    base_name = f"pretrained {pretrained}"
    tvs = [TaskVector(SafetensorsFile(p), base, str(p), base_name) for p in experts]
    if not tvs[0]:
        raise ValueError(f"{pretrained} has no floating-point tensors: nothing to merge")
    return tvs


def save(
    state: TensorMap, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write atomically: a temporary file in the target folder, renamed when complete.

    A failure (a non-finite tensor, a full disk) leaves no temporary file and no folder it
    created, and an existing file at ``path`` unchanged.
    """
    path = check_output(path)
    created = _missing_folders(path.parent)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            _write(f, state, metadata or {}, target=str(path))
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        for folder in created:  # deepest first; rmdir keeps anything someone else put there
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def check_output(
    path: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), what: str = "output"
) -> Path:
    """``path`` as a Path, or ValueError if writing it would destroy something: an input
    (same file by inode or resolved path: a symlink, a hard link, ./x), a directory, a device
    or a fifo (os.replace would put a regular file in its place), or a file used as a folder.
    Missing folders are fine: save creates them.
    """
    if not os.fspath(path):
        raise ValueError(f"{what} is an empty path; expected a .safetensors file path")
    path = Path(path)
    for source in inputs:
        if _same_file(path, source):
            raise ValueError(f"{what} {path} is the input {source}; writing it would destroy it")
    try:
        if path.exists() and not path.is_file():
            raise ValueError(f"{what} {path} is {file_kind(path)}; expected a file path")
        folder = existing_ancestor(path.parent)
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise ValueError(f"{what} {path}: {err.strerror}") from None
        raise  # permissions: the environment, not the value
    if not folder.is_dir():
        raise ValueError(f"{what} {path}: {folder} is not a directory")
    return path


def existing_ancestor(folder: Path) -> Path:
    """``folder`` or its nearest existing parent: where save's mkdir would start."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:  # either does not exist (yet)
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def make_readable(path: str | os.PathLike) -> None:
    """mkstemp creates 0600 files; give the renamed result the permissions open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write(
    f: BinaryIO, state: TensorMap, metadata: Mapping[str, str], target: str = "a file"
) -> None:
    """The safetensors layout, streamed tensor by tensor (safetensors' own save_file first
    copies every tensor to bytes, doubling peak memory). Sorted keys, no timestamps: the
    same tensors always give the same bytes, so DVC sees unchanged outputs as unchanged.
    A NaN/Inf tensor is refused as it streams: no writer in the project can store one."""
    codes = _CODES
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
        check_finite(tensor, key, f"refusing to write {target}")
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
