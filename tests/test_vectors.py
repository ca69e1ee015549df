import json
import os
import stat
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import vit_like

from mergeloom import vectors


def with_buffer(state):
    return {**state, "num_batches_tracked": torch.tensor(7, dtype=torch.int64)}


def test_apply_inverts_subtract_and_copies_int_buffers():
    base, expert = with_buffer(vit_like(0)), with_buffer(vit_like(1))
    expert["num_batches_tracked"] = torch.tensor(9)
    delta = vectors.subtract(expert, base)
    assert "num_batches_tracked" not in delta
    back = vectors.apply(base, delta)
    assert back["num_batches_tracked"].item() == 7  # copied from theta_0, not merged
    for key in vit_like(1):
        torch.testing.assert_close(back[key], expert[key])


def test_apply_inplace_reuses_delta_dict():
    base, delta = vit_like(0), vit_like(1)
    out = vectors.apply(base, delta, inplace=True)
    assert out is delta
    torch.testing.assert_close(out["proj"], vit_like(0)["proj"] + vit_like(1)["proj"])


def test_key_mismatch_names_up_to_five_keys():
    a = {f"k{i}": torch.zeros(1) for i in range(8)}
    with pytest.raises(ValueError, match=r"missing \['k0', 'k1', 'k2', 'k3', 'k4'\]"):
        vectors.check_compatible([a, {}])


def test_shape_mismatch_names_key_and_shapes():
    a, b = {"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match=r"w: \(3, 2\) vs \(2, 3\)"):
        vectors.check_compatible([a, b])


def test_safetensors_round_trip_keeps_values_and_metadata(tmp_path):
    state = with_buffer(vit_like(0))
    path = tmp_path / "m.safetensors"
    vectors.save(state, path, metadata={"arch": "ViT-B-32"})
    source = vectors.SafetensorsFile(path)
    assert source.metadata == {"arch": "ViT-B-32"}
    assert source.shape("proj") == (6, 4)
    assert vectors.floating_keys(source) == sorted(vit_like(0))
    loaded = vectors.load(path)
    assert loaded.keys() == state.keys()
    for key in state:
        assert torch.equal(loaded[key], state[key])
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_files_are_standard_safetensors_and_byte_stable(tmp_path):
    state = with_buffer(vit_like(0))
    state["half"] = torch.randn(3, generator=torch.Generator().manual_seed(0)).bfloat16()
    state["empty"] = torch.zeros(0, 4)
    vectors.save(state, tmp_path / "a.safetensors", metadata={"method": "ties"})
    vectors.save(dict(reversed(list(state.items()))), tmp_path / "b.safetensors",
                 metadata={"method": "ties"})  # fmt: skip
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = safetensors.torch.load_file(tmp_path / "a.safetensors")
    assert loaded.keys() == state.keys()
    for key in state:
        assert torch.equal(loaded[key], state[key]) and loaded[key].dtype == state[key].dtype
    with safetensors.safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"method": "ties"}
    ours = vectors.load(tmp_path / "a.safetensors")
    assert all(torch.equal(ours[k], state[k]) for k in state)
    safetensors.torch.save_file({"w": state["proj"]}, tmp_path / "lib.safetensors")
    assert torch.equal(vectors.load(tmp_path / "lib.safetensors")["w"], state["proj"])


def test_read_into_fills_without_allocating(tmp_path):
    vectors.save(vit_like(0), tmp_path / "a.safetensors")
    source = vectors.SafetensorsFile(tmp_path / "a.safetensors")
    out = torch.empty(2, 6, 4)
    source.read_into("proj", out[1])
    assert torch.equal(out[1], vit_like(0)["proj"])


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def killed_mid_write(f, state, metadata, target):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(vectors, "_write", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        vectors.save(vit_like(0), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="not found: .*nope.safetensors"):
        vectors.SafetensorsFile(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}garbage")
    with pytest.raises(ValueError, match="cannot read safetensors file .*bad.safetensors"):
        vectors.SafetensorsFile(bad)
    text = b'"a json string, not an object"'  # valid JSON of the wrong kind
    bad.write_bytes(len(text).to_bytes(8, "little") + text)
    with pytest.raises(ValueError, match="its header does not start with '{' \\(a JSON object\\)"):
        vectors.SafetensorsFile(bad)


def test_nan_names_file_and_key(tmp_path):
    state = vit_like(0)
    state["proj"][0, 0] = float("nan")
    safetensors.torch.save_file(state, tmp_path / "e.safetensors")  # vectors.save refuses NaN
    source = vectors.SafetensorsFile(tmp_path / "e.safetensors")
    source["conv1.weight"]  # finite keys read fine
    with pytest.raises(ValueError, match=r"e.safetensors: tensor 'proj' contains NaN or Inf"):
        source["proj"]


def test_lazy_task_vectors_equal_in_memory_subtraction(tmp_path):
    vectors.save(with_buffer(vit_like(0)), tmp_path / "base.safetensors")
    vectors.save(with_buffer(vit_like(1)), tmp_path / "expert.safetensors")
    (tv,) = vectors.load_task_vectors(
        tmp_path / "base.safetensors", [tmp_path / "expert.safetensors"]
    )
    expected = vectors.subtract(vit_like(1), vit_like(0))
    assert sorted(tv) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(tv[key], expected[key])


def test_expert_with_other_keys_is_rejected(tmp_path):
    vectors.save(vit_like(0), tmp_path / "base.safetensors")
    other = vit_like(1)
    other["extra.weight"] = other.pop("proj")
    vectors.save(other, tmp_path / "expert.safetensors")
    with pytest.raises(ValueError, match=r"missing \['proj'\], unexpected \['extra.weight'\]"):
        vectors.load_task_vectors(tmp_path / "base.safetensors", [tmp_path / "expert.safetensors"])


def test_cosine_similarity():
    a = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([0.0])}
    c = {"w": torch.tensor([3.0, 3.0]), "b": torch.tensor([0.0])}
    sim = vectors.cosine_similarity([a, b, c, a])
    assert torch.allclose(sim, sim.T)
    assert sim[0, 0] == pytest.approx(1.0) and sim[0, 3] == pytest.approx(1.0)
    assert sim[0, 1] == pytest.approx(0.0)
    assert sim[0, 2] == pytest.approx(2**-0.5)


def test_a_key_must_be_floating_in_every_state_or_in_none(tmp_path):
    f32 = {"w": torch.zeros(2), "n": torch.tensor(1)}
    f16 = {"w": torch.zeros(2, dtype=torch.float16), "n": torch.tensor(1, dtype=torch.int32)}
    vectors.check_compatible([f32, f16])  # float widths and integer widths may differ
    i32 = {"w": torch.zeros(2, dtype=torch.int32), "n": torch.tensor(1)}
    with pytest.raises(ValueError, match=r"^e: 'w' is I32 but F32 in p; a key must be floating"):
        vectors.check_compatible([f32, i32], names=["p", "e"])
    vectors.save(i32, tmp_path / "i.safetensors")
    vectors.save(f32, tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match=r"'w' is F32 but I32 in pretrained .*i.safetensors"):
        vectors.load_task_vectors(tmp_path / "i.safetensors", [tmp_path / "f.safetensors"])
    with pytest.raises(ValueError, match=r"'w' is I32 but F32 in #0"):  # a file against a dict
        vectors.check_compatible([vectors.SafetensorsFile(tmp_path / "f.safetensors"), i32])


def test_directory_and_other_formats_say_what_they_are(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory, expected a .safetensors file"):
        vectors.SafetensorsFile(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"c.pt is not a safetensors file: it is a zip archive"):
        vectors.SafetensorsFile(tmp_path / "c.pt")
    nested = b'{"a":' * 100_000
    (tmp_path / "n.safetensors").write_bytes(len(nested).to_bytes(8, "little") + nested)
    with pytest.raises(ValueError, match=r"n.safetensors: its header JSON is nested too deeply"):
        vectors.SafetensorsFile(tmp_path / "n.safetensors")


def test_save_never_replaces_a_directory_or_device(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match=r"output .*d is a directory; expected a file path"):
        vectors.save(vit_like(0), tmp_path / "d")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"output .*pipe is a fifo; expected a file path"):
        vectors.save(vit_like(0), tmp_path / "pipe")
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "pipe"]
    assert not any((tmp_path / "d").iterdir())


def crafted(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize(
    ("offsets", "data", "message"),
    [
        ({"a": [0, 4], "b": [0, 4]}, 4, r"'b' has data offsets \[0, 4\] where 4 was expected"),
        ({"a": [4, 8]}, 8, r"'a' has data offsets \[4, 8\] where 0 was expected"),
        ({"a": [0, 4]}, 8, r"its tensors fill 4 of its 8 data bytes; expected all"),
    ],
)
def test_tensors_must_tile_the_data_section(tmp_path, offsets, data, message):
    """Overlaps, gaps and trailing bytes: the format forbids them and the library's reader
    refuses them; our header check names the tensor, in one line."""
    path = tmp_path / "x.safetensors"
    crafted(path, {k: {"dtype": "F32", "shape": [1], "data_offsets": o}
                   for k, o in offsets.items()}, b"\0" * data)  # fmt: skip
    with pytest.raises(
        ValueError, match=rf"^cannot read safetensors file .*x.safetensors: {message}"
    ):
        vectors.SafetensorsFile(path)
    empty_first = {"e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                   "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}  # fmt: skip
    crafted(path, empty_first, b"\0" * 4)
    assert {k: v.tolist() for k, v in vectors.SafetensorsFile(path).items()} == {
        "a": [0.0],
        "e": [],
    }


def test_reads_map_nothing_and_check_each_key_once(tmp_path, monkeypatch):
    """No memory map of the file (its touched pages would stay in the RSS), and the NaN/Inf
    check runs once per key however often and however the key is read."""
    path = tmp_path / "m.safetensors"
    vectors.save(vit_like(0), path)
    checked = []
    check = vectors.check_finite
    monkeypatch.setattr(
        vectors, "check_finite", lambda t, k, s: checked.append(k) or check(t, k, s)
    )
    source = vectors.SafetensorsFile(path)
    for key in source:
        for _ in range(2):
            assert torch.equal(source[key], vit_like(0)[key])
            out = torch.empty(source.shape(key))
            source.read_into(key, out)
            assert torch.equal(out, vit_like(0)[key])
    assert sorted(checked) == sorted(vit_like(0))
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(path) not in maps.read_text()


def test_a_file_truncated_after_opening_fails_naming_it(tmp_path):
    path = tmp_path / "t.safetensors"
    vectors.save({"w": torch.ones(1000)}, path)
    source = vectors.SafetensorsFile(path)
    os.truncate(path, 200)
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*t.safetensors: 'w'"):
        source["w"]
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*t.safetensors: 'w'"):
        source.read_into("w", torch.empty(1000))
