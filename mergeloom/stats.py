"""Exact order statistics and quantiles of vectors too large to hold, in bounded memory.

TIES trims by a global top-k and PCB by global quantiles over ~1e8 (ViT-B) to ~3e8 (ViT-L)
entries per task; ``torch.quantile`` refuses more than 2**24 elements and a full sort needs
several copies of the vector. Radix selection reads the data twice (16 high bits, then the 16
low bits inside the chosen bucket) with 65536-bin histograms and gives the exact answer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

Chunks = Callable[[], Iterable[torch.Tensor]]

_BINS = 1 << 16
_OFFSET = 1 << 31
_SORT_BELOW = 1 << 20  # values; below this a plain sort is faster and small
_BLOCK = 1 << 17  # values per row that a radix pass handles at once


def _sortable(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order is the order of the float32 values (a new tensor)."""
    bits = values.float().contiguous().view(torch.int32)
    keys = bits >> 31  # -1 for negative floats, else 0
    keys &= 0x7FFFFFFF
    keys ^= bits  # negative floats: magnitude bits reversed
    return keys


class _Histogram:
    """Counts of int32 bin indices in [0, size), added as many small tensors.

    Callers stream small chunks (PCB computes its balance weights in cache-sized pieces), and
    one bincount costs the whole histogram: indices are copied into one buffer of 4 x size and
    counted when it is full. (Keeping the small tensors in a list instead pins freed heap
    memory: 3.5 GB peak RSS for PCB on ViT-B/32.)
    """

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.counts = torch.zeros(size, dtype=torch.int64, device=device)
        self.buffer = torch.empty(4 * size, dtype=torch.int32, device=device)
        self.filled = 0

    def add(self, bins: torch.Tensor) -> None:
        bins = bins.reshape(-1)
        if self.filled + len(bins) > len(self.buffer):
            self._flush()
        if len(bins) > len(self.buffer):
            self.counts += torch.bincount(bins, minlength=self.size)
            return
        self.buffer[self.filled : self.filled + len(bins)] = bins
        self.filled += len(bins)

    def _flush(self) -> None:
        if self.filled:
            self.counts += torch.bincount(self.buffer[: self.filled], minlength=self.size)
            self.filled = 0

    def result(self) -> torch.Tensor:
        self._flush()
        return self.counts


def _blocks(chunks: Iterable[torch.Tensor], rows: int) -> Iterator[torch.Tensor]:
    """The stream as (rows, n) blocks of n up to ``_BLOCK``: small chunks are copied together,
    so each radix step (~20 tensor ops per block and wanted bucket) runs on large tensors.
    A block is valid until the next one is drawn."""
    buffer, filled = None, 0
    for chunk in chunks:
        chunk = chunk.reshape(rows, -1)
        n = chunk.shape[1]
        if filled and filled + n > _BLOCK:
            yield buffer[:, :filled]
            filled = 0
        if n > _BLOCK // 2:
            yield chunk
            continue
        if buffer is None:
            buffer = torch.empty(rows, _BLOCK, device=chunk.device)
        buffer[:, filled : filled + n] = chunk
        filled += n
    if filled:
        yield buffer[:, :filled]


def _to_float(key: int) -> float:
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def order_statistics(
    chunks: Chunks, ranks: Sequence[Sequence[int]], count: int | None = None
) -> list[list[float]]:
    """Exact values at 0-based ``ranks`` of each row of a stream of (R, n) float tensors.

    ``chunks()`` may be called more than once and must yield the same chunks each time; row r
    of every chunk belongs to vector r, whose wanted ranks are ``ranks[r]``. ``count`` (values
    per row) saves a pass when known. Inputs below ``_SORT_BELOW`` values are simply sorted.
    """
    rows = len(ranks)
    count = count if count is not None else count_values(chunks) // rows
    for row_ranks in ranks:
        bad = [k for k in row_ranks if not 0 <= k < count]
        if bad:
            raise ValueError(f"rank(s) {bad} out of range for a vector of {count} values")
    if count * rows <= _SORT_BELOW:
        ordered = torch.cat([c.reshape(rows, -1).float() for c in chunks()], dim=1).sort().values
        return [[ordered[r, k].item() for k in row_ranks] for r, row_ranks in enumerate(ranks)]
    # pass 1: histogram of the high 16 bits of every row, on the device of the chunks
    histogram = None
    for block in _blocks(chunks(), rows):
        buckets = _sortable(block)
        if histogram is None:
            device = buckets.device
            offsets = torch.arange(rows, dtype=torch.int32, device=device) * _BINS + _BINS // 2
            histogram = _Histogram(rows * _BINS, device)
        buckets >>= 16
        buckets += offsets[:, None]
        histogram.add(buckets)
    high = histogram.result().view(rows, _BINS)
    cumulative = high.cumsum(dim=1)
    wanted = []  # (row, signed high bits, rank inside that bucket)
    for r, row_ranks in enumerate(ranks):
        for k in row_ranks:
            bucket = int(torch.searchsorted(cumulative[r], k, right=True))
            below = int(cumulative[r, bucket] - high[r, bucket])
            wanted.append((r, bucket - _BINS // 2, k - below))
    # pass 2: histogram of the low 16 bits inside each wanted bucket
    targets = sorted({(r, b) for r, b, _ in wanted})
    low = {target: _Histogram(_BINS, device) for target in targets}
    for block in _blocks(chunks(), rows):
        keys = _sortable(block)
        high_bits = keys >> 16
        for r, b in targets:
            low[(r, b)].add(keys[r][high_bits[r] == b] & 0xFFFF)
    results: list[list[float]] = [[] for _ in range(rows)]
    for r, b, k in wanted:
        position = int(torch.searchsorted(low[(r, b)].result().cumsum(0), k, right=True))
        results[r].append(_to_float((b << 16) | position))
    return results


def count_values(chunks: Chunks) -> int:
    return sum(chunk.numel() for chunk in chunks())


def quantiles(
    chunks: Chunks, qs: Sequence[float], rows: int = 1, count: int | None = None
) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) of each row, for inputs of any size: (R, Q).

    ``count`` (values per row) saves a pass over the data when the caller knows it.
    """
    bad = [q for q in qs if not 0.0 <= q <= 1.0]
    if bad:
        raise ValueError(f"quantile levels must lie in [0, 1], got {bad}")
    n = count if count is not None else count_values(chunks) // rows
    positions = [q * (n - 1) for q in qs]
    needed = sorted({int(p) for p in positions} | {min(int(p) + 1, n - 1) for p in positions})
    values = order_statistics(chunks, [needed] * rows, count=n)
    out = torch.empty(rows, len(qs), dtype=torch.float64)
    for r in range(rows):
        at = dict(zip(needed, values[r], strict=True))
        for j, p in enumerate(positions):
            lo, hi = at[int(p)], at[min(int(p) + 1, n - 1)]
            out[r, j] = lo + (hi - lo) * (p - int(p))
    return out.float()


def topk_threshold(chunks: Chunks, fraction: float, count: int | None = None) -> float:
    """Magnitude threshold keeping the top ``fraction`` of entries (TIES's order statistic).

    With d entries the threshold is the (d - floor(d * fraction))-th smallest |value|, and
    entries with |value| >= threshold are kept, as in the TIES reference code. ``fraction``
    of 1 keeps everything (threshold 0).
    """
    d = count if count is not None else count_values(chunks)
    kth = d - int(d * fraction)  # 1-based rank of the threshold
    if kth <= 0:
        return 0.0
    return order_statistics(lambda: (c.abs() for c in chunks()), [[kth - 1]], count=d)[0][0]
