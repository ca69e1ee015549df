"""Bad input to the `mergeloom` CLI: exit 2, one `mergeloom: error:` line naming the value,
nothing written and every input byte-identical; environment failures exit 1 in one line."""

import errno
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mergeloom import vectors
from mergeloom.cli import main


@dataclass
class Workspace:
    """A folder with a pretrained file, two experts and a default --out (not yet written)."""

    dir: Path
    p: Path
    e0: Path
    e1: Path
    out: Path

    def file(self, name: str, data: bytes) -> Path:
        (self.dir / name).write_bytes(data)
        return self.dir / name

    def merge(self, *extra, experts=None, pretrained=None, out=None, command="merge"):
        return [
            command, "task_arithmetic",
            "--pretrained", pretrained or self.p,
            "--experts", *(experts or [self.e0, self.e1]),
            "--out", self.out if out is None else out,
            *extra,
        ]  # fmt: skip

    def weave(self, *extra, **kwargs):
        return self.merge(*extra, command="weave", **kwargs)


def state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=g).to(dtype),
        "layer.bias": torch.randn(4, generator=g).to(dtype),
        "steps": torch.tensor([5], dtype=torch.int64),
    }


@pytest.fixture
def ws(tmp_path) -> Workspace:
    folder = tmp_path / "w"
    folder.mkdir()
    paths = [folder / name for name in ("p.safetensors", "e0.safetensors", "e1.safetensors")]
    for seed, path in enumerate(paths):
        vectors.save(state(seed), path)
    return Workspace(folder, *paths, folder / "out.safetensors")


def header_file(header: object, data: bytes = b"") -> bytes:
    """A file in the safetensors layout around any header, for crafted headers."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def with_state(ws: Workspace, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = ws.dir / name
    safetensors.torch.save_file(tensors, path)
    return path


def torch_checkpoint(ws: Workspace, name: str, zipped: bool) -> Path:
    path = ws.dir / name
    torch.save(state(1), path, _use_new_zipfile_serialization=zipped)
    return path


# Each case: (workspace) -> (argv, text the one error line must contain).
def out_is_pretrained(ws):
    return ws.merge(out=ws.p), f"--out {ws.p} is the input {ws.p}"


def out_is_pretrained_dot_slash(ws):
    out = f"{ws.dir}/./p.safetensors"
    return ws.merge(out=out), f"--out {Path(out)} is the input {ws.p}"


def out_is_expert_symlink(ws):
    (ws.dir / "link.safetensors").symlink_to(ws.e1.name)  # relative, as users make them
    return ws.merge(out=ws.dir / "link.safetensors"), "link.safetensors is the input"


def out_is_expert_hard_link(ws):
    os.link(ws.e0, ws.dir / "hard.safetensors")
    return ws.merge(out=ws.dir / "hard.safetensors"), f"hard.safetensors is the input {ws.e0}"


def out_is_empty(ws):
    return ws.merge(out=""), "--out is an empty path"


def out_is_directory(ws):
    (ws.dir / "folder").mkdir()
    return ws.merge(out=ws.dir / "folder"), f"--out {ws.dir / 'folder'} is a directory"


def out_is_symlink_to_directory(ws):
    (ws.dir / "folder").mkdir()
    (ws.dir / "dirlink").symlink_to("folder")
    return ws.merge(out=ws.dir / "dirlink"), "dirlink is a directory"


def out_is_dev_null(ws):
    return ws.merge(out="/dev/null"), "--out /dev/null is a character device"


def out_is_fifo(ws):
    os.mkfifo(ws.dir / "pipe")
    return ws.merge(out=ws.dir / "pipe"), "pipe is a fifo"


def out_parent_is_a_file(ws):
    out = ws.dir / "e1.safetensors" / "m.safetensors"
    return ws.merge(out=out), f"{ws.e1} is not a directory"


def expert(ws, path):
    return ws.merge(experts=[ws.e0, path])


def expert_is_directory(ws):
    (ws.dir / "d.safetensors").mkdir()
    path = ws.dir / "d.safetensors"
    return expert(ws, path), f"{path} is a directory, expected a .safetensors file"


def expert_is_text(ws):
    path = ws.file("notes.safetensors", b"these are not tensors\n")
    return expert(ws, path), f"{path} is not a safetensors file: it starts with text"


def expert_is_random_bytes(ws):
    path = ws.file("r.safetensors", bytes(range(200, 256)) * 20)
    return expert(ws, path), f"{path} is not a safetensors file: its 8-byte header length"


def expert_is_empty(ws):
    path = ws.file("empty.safetensors", b"")
    return expert(ws, path), f"{path} is not a safetensors file: it is empty"


def expert_is_torch_zip(ws):
    path = torch_checkpoint(ws, "c.pt", zipped=True)
    return expert(ws, path), f"{path} is not a safetensors file: it is a zip archive"


def expert_is_torch_pickle(ws):
    path = torch_checkpoint(ws, "legacy.pth", zipped=False)
    return expert(ws, path), f"{path} is not a safetensors file: it looks like a pickle"


def expert_is_missing(ws):
    return expert(ws, ws.dir / "nope.safetensors"), "safetensors file not found: "


def pretrained_is_directory(ws):
    (ws.dir / "pd").mkdir()
    return ws.merge(pretrained=ws.dir / "pd"), "pd is a directory, expected a .safetensors"


def crafted(name, header, data=b"", message=""):
    def case(ws):
        path = ws.file(f"{name}.safetensors", header_file(header, data))
        return expert(ws, path), f"cannot read safetensors file {path}: {message}"

    case.__name__ = f"header_{name}"
    return case


def int_stored_expert(ws):
    tensors = {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in state(1).items()}
    path = with_state(ws, "int.safetensors", tensors)
    return expert(ws, path), f"{path}: 'layer.bias' is I32 but F32 in pretrained {ws.p}"


def int_pretrained(ws):
    tensors = {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in state(0).items()}
    path = with_state(ws, "pint.safetensors", tensors)
    return ws.merge(pretrained=path), f"'layer.bias' is F32 but I32 in pretrained {path}"


def no_floating_tensors(ws):
    tensors = {"steps": torch.tensor([5])}
    paths = [with_state(ws, f"i{i}.safetensors", tensors) for i in range(2)]
    return ws.merge(pretrained=paths[0], experts=paths[1:]), "has no floating-point tensors"


def option(builder, *extra, message):
    def case(ws):
        return getattr(ws, builder)(*extra), message

    return case


ENTRY = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
CASES = {
    "out=pretrained": out_is_pretrained,
    "out=./pretrained": out_is_pretrained_dot_slash,
    "out=symlink to expert": out_is_expert_symlink,
    "out=hard link to expert": out_is_expert_hard_link,
    "out=''": out_is_empty,
    "out=directory": out_is_directory,
    "out=symlink to directory": out_is_symlink_to_directory,
    "out=/dev/null": out_is_dev_null,
    "out=fifo": out_is_fifo,
    "out under a file": out_parent_is_a_file,
    "out name too long": lambda ws: (ws.merge(out=ws.dir / ("x" * 300)), "File name too long"),
    "lambdas nan,0.1": option("weave", "--lambdas", "nan,0.1", message="'nan,0.1': nan is inv"),
    "lambdas 1e39,1": option("weave", "--lambdas", "1e39,1", message="'1e39,1': 1e+39 is inv"),
    "lambdas 0:1:1e-9": option(
        "weave", "--lambdas", "0:1:1e-9", message="'0:1:1e-9' gives 1e+09 values"
    ),
    "lambdas 0:inf:0.1": option("weave", "--lambdas", "0:inf:0.1", message="inf is invalid"),
    "lambdas -1,0.5": option("weave", "--lambdas=-1,0.5", message="-1.0 is invalid"),
    "lambdas empty": option("weave", "--lambdas", "", message="--lambdas '': expected start"),
    "lam nan": option("merge", "--lam", "nan", message="--lam: nan is invalid"),
    "lam 1e39": option("merge", "--lam", "1e39", message="--lam: 1e+39 is invalid"),
    "lam -0.5": option("merge", "--lam", "-0.5", message="--lam: -0.5 is invalid"),
    "lam abc": option("merge", "--lam", "abc", message="invalid float value: 'abc'"),
    "set lam=1e39": option("merge", "--set", "lam=1e39", message="lam: 1e+39 is invalid"),
    "set k=abc (method without k)": option(
        "merge", "--set", "lam=0.3", "--set", "k=abc", message="task_arithmetic has no hyper"
    ),
    "set ties k=abc": lambda ws: (
        ["merge", "ties", *ws.merge()[2:], "--set", "k=abc"],
        "ties: k must be in (0.0, 1.0], got 'abc'",
    ),
    "set ties k=0": lambda ws: (
        ["weave", "ties", *ws.merge()[2:], "--set", "k=0"],
        "ties: k must be in (0.0, 1.0], got 0",
    ),
    "set learning_rate=1e-3": option(
        "merge", "--set", "learning_rate=1e-3", message="no hyperparameter ['learning_rate']"
    ),
    "set k=[1,": option("merge", "--set", "k=[1,", message="--set 'k=[1,': cannot read"),
    "pool-set k=abc": option(
        "weave", "--pool", "ties", "--pool-set", "k=abc", message="ties: k must be in (0.0, 1.0]"
    ),
    "pool-set density=0.1": option(
        "weave", "--pool", "ties", "--pool-set", "density=0.1", message="['density']"
    ),
    "pool nosuch": option("weave", "--pool", "nosuch", message="unknown pool 'nosuch'"),
    "seed abc": option("weave", "--seed", "abc", message="invalid int value: 'abc'"),
    "expert=directory": expert_is_directory,
    "pretrained=directory": pretrained_is_directory,
    "expert=missing": expert_is_missing,
    "expert=text": expert_is_text,
    "expert=random bytes": expert_is_random_bytes,
    "expert=empty file": expert_is_empty,
    "expert=torch.save .pt": expert_is_torch_zip,
    "expert=legacy torch .pth": expert_is_torch_pickle,
    "header entry not an object": crafted(
        "entry", {"w": [1, 2]}, message="'w' is a JSON array, expected an object"
    ),
    "header dtype unknown": crafted(
        "dtype", {"w": {**ENTRY, "dtype": "Q7"}}, b"\0" * 4, "'w' has dtype 'Q7'; expected"
    ),
    "header dtype not a string": crafted(
        "dtype2", {"w": {**ENTRY, "dtype": ["F32"]}}, b"\0" * 4, "'w' has dtype ['F32']"
    ),
    "header shape with a string": crafted(
        "shape", {"w": {**ENTRY, "shape": ["1"]}}, b"\0" * 4, "'w' has shape ['1']"
    ),
    "header shape with a bool": crafted(
        "shapeb", {"w": {**ENTRY, "shape": [True]}}, b"\0" * 4, "'w' has shape [True]"
    ),
    "header shape missing": crafted(
        "noshape", {"w": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4, "'w' has shape None"
    ),
    "header offsets not fitting": crafted(
        "offsets",
        {"w": {**ENTRY, "data_offsets": [0, 400]}},
        b"\0" * 4,
        "'w' has data offsets [0, 400]",
    ),
    "header offsets of 3 ints": crafted(
        "offsets3",
        {"w": {**ENTRY, "data_offsets": [0, 4, 8]}},
        b"\0" * 4,
        "'w' has data_offsets [0, 4, 8]",
    ),
    "header nested objects": crafted(
        "nested", b'{"a":' * 100_000, message="its header JSON is nested too deeply"
    ),
    "header nested arrays": crafted(
        "nestedl", b"[" * 100_000, message="its header does not start with '{'"
    ),
    "header a JSON list": crafted(
        "list", [ENTRY], b"\0" * 4, message="its header does not start with '{'"
    ),
    "header invalid JSON": crafted("json", b"{not json}", message="Expecting property name"),
    "header invalid UTF-8": crafted(
        "utf8", b'{"\xff": 1}', message="'utf-8' codec can't decode byte 0xff"
    ),
    "header __metadata__ a list": crafted(
        "meta", {"__metadata__": ["a"], "w": ENTRY}, b"\0" * 4, "__metadata__ is ['a']"
    ),
    "header __metadata__ not str->str": crafted(
        "meta2", {"__metadata__": {"a": 1}, "w": ENTRY}, b"\0" * 4, "__metadata__ is {'a': 1}"
    ),
    "expert stored as int": int_stored_expert,
    "pretrained stored as int": int_pretrained,
    "no floating tensors": no_floating_tensors,
}

# Run through the installed console script too: what a user sees, with no traceback.
SCRIPT_CASES = [
    "out=pretrained",
    "out=hard link to expert",
    "out=/dev/null",
    "lambdas 0:1:1e-9",
    "lam abc",
    "set ties k=abc",
    "expert=torch.save .pt",
    "header nested objects",
    "pretrained stored as int",
]


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder`` (links not followed): a file's bytes, a link's target."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                entries[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISREG(mode):
                entries[str(path)] = ("file", path.read_bytes())
            else:
                entries[str(path)] = ("other", stat.S_IFMT(mode))
    return entries


def entry_point() -> list[str]:
    script = Path(sys.executable).with_name("mergeloom")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mergeloom"]


def run_in_process(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    return code, capsys.readouterr().err


def run_script(argv) -> tuple[int, str]:
    result = subprocess.run(
        [*entry_point(), *(str(a) for a in argv)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.stdout == ""
    return result.returncode, result.stderr


def assert_one_line(code: int, err: str, want_code: int, message: str) -> None:
    assert "Traceback" not in err, err
    assert code == want_code, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("mergeloom: error: "), err
    assert message in err, err


def check_case(name, ws, run) -> None:
    argv, message = CASES[name](ws)
    before = snapshot(ws.dir)
    code, err = run(argv)
    assert_one_line(code, err, 2, message)
    assert snapshot(ws.dir) == before  # no --out, no temp file, every input byte-identical
    assert_dev_null_intact()


def assert_dev_null_intact() -> None:
    """--out /dev/null must never replace the device; should a regression do it as root, put
    the device back before failing, so the machine keeps working."""
    if stat.S_ISCHR(os.stat("/dev/null").st_mode):
        return
    if os.geteuid() == 0:
        os.unlink("/dev/null")
        os.mknod("/dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.chmod("/dev/null", 0o666)
    pytest.fail("/dev/null was replaced by a regular file")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, ws, capsys):
    check_case(name, ws, lambda argv: run_in_process(argv, capsys))


@pytest.mark.parametrize("name", SCRIPT_CASES)
def test_bad_input_through_the_console_script(name, ws):
    check_case(name, ws, run_script)


def test_the_good_run_of_the_table_works(ws, capsys):
    """The table's rows fail for their bad value alone: the same run without it succeeds."""
    code, err = run_in_process(ws.weave("--lambdas", "0.1,0.5"), capsys)
    assert code == 0, err
    assert sorted(vectors.load(ws.out)) == ["layer.bias", "layer.weight", "steps"]


def overflowing_inputs(ws) -> list[object]:
    """Finite float16 inputs whose merge at lam 2 overflows float16 (-180000 < -65504)."""
    base = {"w": torch.full((3,), 60000.0, dtype=torch.float16)}
    far = {"w": torch.full((3,), -60000.0, dtype=torch.float16)}
    p, e = with_state(ws, "p16.safetensors", base), with_state(ws, "e16.safetensors", far)
    return ws.merge("--lam", "2", pretrained=p, experts=[e])


@pytest.mark.parametrize("cause", ["non-finite merge", "int-stored expert"])
def test_existing_out_is_kept_when_a_run_fails(ws, capsys, cause):
    ws.out.write_bytes(b"an earlier result")
    if cause == "non-finite merge":
        argv = overflowing_inputs(ws)
        message = f"refusing to write {ws.out}: tensor 'w' contains NaN or Inf"
    else:
        argv, message = int_stored_expert(ws)
    before = snapshot(ws.dir)
    code, err = run_in_process(argv, capsys)
    assert_one_line(code, err, 2, message)
    assert snapshot(ws.dir) == before
    assert ws.out.read_bytes() == b"an earlier result"


def test_failed_run_into_a_missing_folder_creates_no_folder(ws, capsys):
    argv = overflowing_inputs(ws)
    out = ws.dir / "new" / "deeper" / "m.safetensors"
    argv[argv.index("--out") + 1] = out
    code, err = run_in_process(argv, capsys)
    assert_one_line(code, err, 2, f"refusing to write {out}: tensor 'w'")
    assert not (ws.dir / "new").exists()


def test_save_refuses_non_finite_naming_key_and_path(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    bad = {"a": torch.zeros(2), "b.weight": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match=r"refusing to write .*m.safetensors: tensor 'b.weight'"):
        vectors.save(bad, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    bad["b.weight"] = torch.tensor([float("-inf")], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"tensor 'b.weight' contains NaN or Inf"):
        vectors.save(bad, tmp_path / "sub" / "n.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no folder left


def test_full_disk_is_one_line_exit_1(ws, capsys, monkeypatch):
    def disk_full(f, state, metadata, target):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(vectors, "_write", disk_full)
    ws.out.write_bytes(b"an earlier result")
    before = snapshot(ws.dir)
    code, err = run_in_process(ws.merge(), capsys)
    assert_one_line(code, err, 1, f"cannot write {ws.out}: No space left on device")
    assert snapshot(ws.dir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_is_one_line_exit_1(ws, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        before = snapshot(ws.dir)
        code, err = run_in_process(ws.merge(out=folder / "m.safetensors"), capsys)
        assert_one_line(code, err, 1, f"cannot write {folder / 'm.safetensors'}: Permission")
        assert list(folder.iterdir()) == [] and snapshot(ws.dir) == before
    finally:
        folder.chmod(0o755)
