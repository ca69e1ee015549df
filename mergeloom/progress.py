"""Progress of long loops: a tqdm bar on a terminal, plain lines in logs.

tqdm draws nothing useful when stderr is not a terminal (CI, `dvc exp run --queue`, a log file):
with ``disable=None`` it is silent, otherwise its carriage-return redraws pile up in one line.
There, ``progress`` writes one line at every ``EVERY_FRACTION`` of the total or every
``EVERY_SECONDS``, whichever comes first, with done/total, rate and ETA, never more often than
every ``MIN_SECONDS``. A transient loop (``leave=False``: an inner loop, such as one merge's pass
over the tensors) stays silent unless it runs longer than ``MIN_SECONDS``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
EVERY_FRACTION = 0.1
EVERY_SECONDS = 30.0
MIN_SECONDS = 5.0


def progress(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    initial: int = 0,
    unit: str = "item",
    leave: bool = True,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """Iterate ``iterable`` while showing progress on ``stream`` (stderr by default).

    Args:
        desc: What the loop does, the line's prefix (``"finetune"``).
        total: Number of items; ``len(iterable)`` when None.
        initial: Items already done before this iterable (a resumed run).
        unit: What one item is (``"step"``, ``"tensor"``).
        leave: Keep the finished bar on a terminal and write the final line in a log; False for
            inner loops that only matter when they are slow.
    """
    stream = sys.stderr if stream is None else stream
    total = len(iterable) if total is None else total  # type: ignore[arg-type]
    if stream.isatty():
        yield from tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit,
                        leave=leave, file=stream)  # fmt: skip
        return
    start = last = time.monotonic()
    step = max(1, round(total * EVERY_FRACTION))
    next_mark = (initial // step + 1) * step
    done = initial
    wrote = False
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        due = done >= next_mark or now - last >= EVERY_SECONDS
        if due and done < total and now - last >= MIN_SECONDS:
            stream.write(_line(desc, done, total, initial, unit, now - start) + "\n")
            stream.flush()
            last, wrote = now, True
        if done >= next_mark:
            next_mark = (done // step + 1) * step
    if leave or wrote:
        stream.write(_line(desc, done, total, initial, unit, time.monotonic() - start) + "\n")
        stream.flush()


def _line(desc: str, done: int, total: int, initial: int, unit: str, elapsed: float) -> str:
    """``finetune: 40/100 steps (40%), 2.31 steps/s, ETA 00:26``; the last one says how long."""
    rate = (done - initial) / elapsed if elapsed > 0 else 0.0
    speed = f"{rate:.3g} {unit}s/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{unit}"
    head = f"{desc}: {done}/{total} {unit}s ({100 * done / max(total, 1):.0f}%), {speed}"
    if done >= total:
        return f"{head}, took {tqdm.format_interval(elapsed)}"
    eta = (total - done) / rate if rate > 0 else float("nan")
    return f"{head}, ETA {tqdm.format_interval(eta) if rate > 0 else '?'}"
