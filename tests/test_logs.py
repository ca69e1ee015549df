"""Quiet, informative logs: progress lines when stderr is not a terminal, no misleading open_clip
warning, other libraries' INFO lines only with `-v`; checked on real stage subprocesses."""

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_data import small_stage_folder

from mergeloom import progress as progress_module
from mergeloom.clip import load_clip
from mergeloom.progress import progress

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "tiny-vit.json"
PROGRESS_LINE = re.compile(r"^(pretrain|finetune): \d+/\d+ steps \(\d+%\), .*(ETA|took) ")


class Clock:
    """time.monotonic for progress(): ``tick`` seconds pass per item consumed."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        return self.now

    def items(self, n: int):
        for i in range(n):
            self.now += self.tick
            yield i


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(n: int, tick: float, **kwargs) -> tuple[list[int], list[str]]:
    clock, log = Clock(tick), io.StringIO()
    saved = progress_module.time.monotonic
    progress_module.time.monotonic = clock
    try:
        seen = list(progress(clock.items(n), total=n, desc="loop", stream=log, **kwargs))
    finally:
        progress_module.time.monotonic = saved
    return seen, log.getvalue().splitlines()


def test_a_log_gets_a_line_every_tenth_with_rate_and_eta_and_a_final_one():
    seen, lines = _lines(100, tick=1.0, unit="step")
    assert seen == list(range(100))
    assert [line.split(" ")[1] for line in lines] == [f"{10 * i}/100" for i in range(1, 11)]
    assert lines[0] == "loop: 10/100 steps (10%), 1 steps/s, ETA 01:30"
    assert lines[-1] == "loop: 100/100 steps (100%), 1 steps/s, took 01:40"


def test_a_slow_loop_gets_a_line_every_30_seconds_before_the_next_tenth():
    _, lines = _lines(1000, tick=1.0)  # a tenth is 100 s
    assert [line.split(" ")[1] for line in lines[:4]] == ["30/1000", "60/1000", "90/1000",
                                                          "100/1000"]  # fmt: skip
    assert lines[0] == "loop: 30/1000 items (3%), 1 items/s, ETA 16:10"


def test_a_quick_loop_writes_one_line_and_a_quick_inner_loop_none():
    assert _lines(50, tick=0.01)[1] == ["loop: 50/50 items (100%), 100 items/s, took 00:00"]
    seen, lines = _lines(50, tick=0.01, leave=False)
    assert seen == list(range(50)) and lines == []
    assert len(_lines(50, tick=1.0, leave=False)[1]) == 10  # a slow inner loop does report


def test_a_resumed_loop_counts_from_where_it_was():
    clock, log = Clock(2.0), io.StringIO()
    saved, progress_module.time.monotonic = progress_module.time.monotonic, clock
    try:
        list(progress(clock.items(50), total=100, initial=50, desc="ft", unit="step", stream=log))
    finally:
        progress_module.time.monotonic = saved
    first = log.getvalue().splitlines()[0]
    assert first == "ft: 60/100 steps (60%), 2 s/step, ETA 01:20"


def test_a_terminal_gets_a_tqdm_bar_and_no_lines():
    terminal = Terminal()
    assert list(progress(range(30), desc="bar", stream=terminal)) == list(range(30))
    text = terminal.getvalue()
    assert "\r" in text and "30/30" in text and "items (100%)" not in text


def test_load_clip_drops_the_random_init_warning_only(caplog):
    with caplog.at_level(logging.WARNING):
        load_clip(str(CONFIG))
        assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
        logging.warning("No pretrained weights loaded for model 'x'")  # after: not filtered
        logging.getLogger("mergeloom.clip").warning("our own")
    assert [r.getMessage() for r in caplog.records] == [
        "No pretrained weights loaded for model 'x'",
        "our own",
    ]


# ------------------------------------------------ real stages, stderr to a pipe (not a terminal)


def _stage(folder: Path, *args: str) -> str:
    """stderr of a stage run as `dvc repro` runs it: to a pipe, not a terminal."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MERGELOOM_DEVICE": "cpu",
           "MERGELOOM_NUM_WORKERS": "0"}  # fmt: skip
    result = subprocess.run([sys.executable, "-m", *args], cwd=folder, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def stages_run(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """stderr of data, pretrain, heads (-v) and one fine-tuning, run as the pipeline runs them."""
    folder = small_stage_folder(tmp_path_factory.mktemp("logs"))
    models = "models/pretrained.safetensors"
    stderr = {
        "data": _stage(folder, "stages.data", "--out", "data"),
        "pretrain": _stage(folder, "stages.pretrain", "--out", models, "--visual-out",
                           "models/visual.safetensors", "--logs", "logs/pretrain",
                           "--data", "data/pretrain.safetensors"),  # fmt: skip
        "heads -v": _stage(folder, "stages.heads", "-v", "--pretrained", models, "--data-dir",
                           "data", "--out", "models/heads"),  # fmt: skip
        "finetune": _stage(folder, "stages.finetune", "--unit", "multitask", "--task", "digits",
                           "--init", "models/visual.safetensors", "--pretrained", models,
                           "--head", "models/heads/multitask/digits.safetensors", "--data-dir",
                           "data", "--out", "models/expert.safetensors", "--logs", "logs/ft"),
    }  # fmt: skip
    return folder, stderr


def test_stages_say_what_they_wrote_in_one_line_and_nothing_misleading(stages_run):
    _, stderr = stages_run
    assert stderr["data"].splitlines() == ["INFO stages: wrote 5 digit tasks to data"]
    for name in ("pretrain", "finetune"):
        lines = stderr[name].splitlines()
        assert not [line for line in lines if "No pretrained weights" in line or " root: " in line]
        assert [line for line in lines if PROGRESS_LINE.match(line)], lines
        ours = [line for line in lines if line.startswith("INFO stages: ")]
        assert len(ours) == 1 and "wrote models/" in ours[0], lines
        assert len(lines) <= 5, lines
    assert "fine-tuned multitask/digits for 4 steps" in stderr["finetune"]


def test_verbose_brings_back_other_libraries_info_lines_but_not_the_false_warning(stages_run):
    _, stderr = stages_run
    assert "INFO root: Instantiating model architecture: CLIP" in stderr["heads -v"]
    assert "No pretrained weights" not in stderr["heads -v"]
    assert "INFO stages: wrote 7 zero-shot heads to models/heads" in stderr["heads -v"]
