"""Correlation and redundancy measures on hand-made task vectors with known answers."""

import math

import pytest
import torch

from mergeloom import analysis, vectors


def tv(**tensors: list) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def basis(i: int, n: int = 4, scale: float = 1.0) -> dict[str, torch.Tensor]:
    vector = torch.zeros(n)
    vector[i] = scale
    return {"w": vector}


# ---------------------------------------------------------------- correlation


def test_orthogonal_vectors_have_cosine_zero_and_identical_ones_cosine_one():
    orthogonal = analysis.correlation([basis(0), basis(1, scale=3.0), basis(2)])
    assert torch.equal(orthogonal["matrices"]["cosine"], torch.eye(3, dtype=torch.float64))
    assert orthogonal["cosine_mean_off_diagonal"] == 0.0
    same = analysis.correlation([tv(w=[1.0, -2.0, 3.0]), tv(w=[2.0, -4.0, 6.0])])
    assert same["cosine_mean_off_diagonal"] == pytest.approx(1.0)
    opposite = analysis.correlation([tv(w=[1.0, 2.0]), tv(w=[-1.0, -2.0])])
    assert opposite["cosine_mean_off_diagonal"] == pytest.approx(-1.0)


def test_cosine_spans_keys_like_one_concatenated_vector():
    a = tv(x=[1.0, 0.0], y=[2.0])
    b = tv(x=[1.0, 1.0], y=[-1.0])
    flat = torch.cat([a["x"], a["y"]]), torch.cat([b["x"], b["y"]])
    expected = float(torch.nn.functional.cosine_similarity(*flat, dim=0))
    result = analysis.correlation([a, b])
    assert result["cosine_mean_off_diagonal"] == pytest.approx(expected, abs=1e-7)
    assert result["norms"] == pytest.approx([math.sqrt(5), math.sqrt(3)])


def test_zero_task_vector_has_cosine_zero_not_nan():
    cosine = analysis.cosine_from_gram(torch.tensor([[0.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    assert torch.equal(cosine, torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64))


def test_per_group_and_per_layer_cosines_use_only_their_keys():
    aligned_attention = {"transformer.resblocks.0.attn.in_proj_weight": [[1.0, 2.0]],
                         "transformer.resblocks.1.mlp.c_fc.weight": [[1.0, 0.0]]}  # fmt: skip
    other = {"transformer.resblocks.0.attn.in_proj_weight": [[2.0, 4.0]],
             "transformer.resblocks.1.mlp.c_fc.weight": [[0.0, 1.0]]}  # fmt: skip
    result = analysis.correlation([tv(**aligned_attention), tv(**other)])
    assert result["cosine_by_group"] == pytest.approx({"attention": 1.0, "mlp": 0.0})
    rows = {(r["group"], r["layer"]): r["mean_cosine"] for r in result["layers"]}
    expected = {("all", "block0"): 1.0, ("all", "block1"): 0.0,
                ("attention", "block0"): 1.0, ("mlp", "block1"): 0.0}  # fmt: skip
    assert rows == pytest.approx(expected)


def test_alignment_ratio_is_one_for_parallel_and_one_over_sqrt_t_for_orthogonal():
    parallel = analysis.correlation([tv(w=[1.0, 1.0]), tv(w=[3.0, 3.0])])
    assert parallel["alignment_ratio"] == pytest.approx(1.0)
    orthogonal = analysis.correlation([basis(i) for i in range(4)])
    assert orthogonal["alignment_ratio"] == pytest.approx(0.5)
    assert orthogonal["alignment_ratio_if_orthogonal"] == pytest.approx(0.5)


def test_stack_effective_rank_counts_independent_directions():
    rank_one = analysis.correlation([tv(w=[1.0, 2.0, 3.0]), tv(w=[-2.0, -4.0, -6.0])])
    assert rank_one["stack_effective_rank"] == pytest.approx(1.0)
    three = analysis.correlation([basis(i, scale=2.0) for i in range(3)])
    assert three["stack_effective_rank"] == pytest.approx(3.0)


@pytest.mark.parametrize(
    "key, group, depth",
    [
        ("transformer.resblocks.3.attn.in_proj_weight", "attention", 3),
        ("transformer.resblocks.11.mlp.c_proj.bias", "mlp", 11),
        ("transformer.resblocks.0.ln_1.weight", "norms", 0),
        ("ln_pre.bias", "norms", -1),
        ("conv1.weight", "embeddings", -1),
        ("positional_embedding", "embeddings", -1),
        ("class_embedding", "embeddings", -1),
        ("ln_post.weight", "norms", analysis.depth("proj")),
        ("proj", "other", 10_000),
    ],
)
def test_open_clip_keys_map_to_their_group_and_depth(key, group, depth):
    assert analysis.parameter_group(key) == group
    assert analysis.depth(key) == depth


def test_increments_undo_the_cumulative_sum_of_a_chain():
    steps = [tv(w=[1.0, 0.0]), tv(w=[0.0, 2.0]), tv(w=[-1.0, 1.0])]
    cumulative = [steps[0]]
    for step in steps[1:]:
        cumulative.append(vectors.add(cumulative[-1], step))
    recovered = analysis.increments(cumulative)
    for got, want in zip(recovered, steps, strict=True):
        assert torch.equal(got["w"], want["w"])


# ---------------------------------------------------------------- spectra


def test_effective_rank_of_rank_one_is_one_and_of_identity_is_n():
    assert analysis.effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert analysis.effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert analysis.effective_rank(torch.zeros(3)) == 0.0


def test_energy_and_rank_summaries_of_known_spectra():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1, 0 of 14
    assert analysis.energy(s, 0.25) == pytest.approx(9 / 14)
    assert analysis.energy(s, 0.01) == pytest.approx(9 / 14)  # at least one direction
    assert analysis.energy(s, 0.5) == pytest.approx(13 / 14)
    summary = analysis.spectrum_summary(s, [0.5])
    assert summary["k90_ratio"] == pytest.approx(2 / 4)  # 13/14 >= 0.9 at k = 2
    assert summary["stable_rank_ratio"] == pytest.approx(14 / 9 / 4)
    assert summary["energy_top50%"] == pytest.approx(13 / 14)


def test_rank_one_task_matrices_have_effective_rank_one_and_centring_removes_shared_part():
    u, v = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 3.0])
    shared = torch.outer(u, v)
    result = analysis.spectra([{"m": shared}, {"m": 2 * shared}, {"m": shared}], [0.1])
    assert result["uncentered"]["effective_rank_ratio"] == pytest.approx(1 / 3)
    assert result["uncentered"]["energy_top10%"] == pytest.approx(1.0)
    assert result["centered"]["effective_rank_ratio"] == pytest.approx(1 / 3)  # still rank one
    identical = analysis.spectra([{"m": shared}, {"m": shared}], [0.1])
    assert "centered" not in identical  # centred copies of one matrix are zero: undefined
    assert identical["curves"]["sum"][-1] == pytest.approx(1.0)


def test_singular_task_interference_is_zero_for_orthogonal_subspaces():
    a, b = torch.zeros(4, 4), torch.zeros(4, 4)
    a[:2, :2] = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    b[2:, 2:] = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    sti, mass = analysis.singular_task_interference(*torch.linalg.svd(torch.stack([a, b])))
    assert sti == pytest.approx(0.0, abs=1e-9)
    assert mass > 0
    same = torch.stack([a, a + 0.5 * torch.eye(4)])
    overlapping, _ = analysis.singular_task_interference(*torch.linalg.svd(same))
    assert overlapping > 0.1


def decaying(t: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """(T, m, n) float32 matrices whose singular values fall over four decades, as task vectors'
    spectra do (small singular values are the hard case for a Gram matrix)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    q1 = torch.linalg.qr(torch.randn(t, m, r, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(t, n, r, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -4, r, dtype=torch.float64) * (1 + torch.rand(t, r, generator=g))
    return ((q1 * s[:, None, :]) @ q2.mT).float()


@pytest.mark.parametrize("shape", [(3, 40, 12), (3, 12, 40), (2, 16, 16), (8, 30, 9)])
def test_gram_spectra_and_interference_match_a_direct_svd(shape):
    """The Gram-matrix route gives the singular values (raw, centred, summed) and the singular
    task interference of an SVD of the same float32 matrices, tall or wide."""
    stack = decaying(*shape)
    x = stack.double()
    values, (sti, mass) = analysis._key_spectra(stack)
    svdvals = torch.linalg.svdvals
    direct = {"uncentered": svdvals(x), "centered": svdvals(x - x.mean(0)),
              "sum": svdvals(x.sum(0))[None]}  # fmt: skip
    for kind, want in direct.items():
        got = values[kind]
        assert got.shape == want.shape and got.device.type == "cpu"
        top = want[:, :1]  # absolute accuracy relative to each matrix's largest singular value
        assert ((got - want).abs() / top).max() < 1e-7, kind
        assert ((got - want).abs() / want)[want > 1e-3 * top].max() < 1e-7, kind
    want_sti, want_mass = analysis.singular_task_interference(
        *torch.linalg.svd(x, full_matrices=False)
    )
    assert sti == pytest.approx(want_sti, rel=1e-7) and mass == pytest.approx(want_mass, rel=1e-9)


def test_spectra_summaries_match_summaries_of_a_direct_svd():
    energy_top = [0.1, 0.5]
    tall, wide = decaying(3, 24, 8, seed=1), decaying(3, 6, 20, seed=2)
    tvs = [{"a.weight": tall[i], "b.weight": wide[i]} for i in range(3)]
    got = analysis.spectra(tvs, energy_top)
    for kind in ("uncentered", "centered", "sum"):
        rows = []
        for key in ("a.weight", "b.weight"):
            x = torch.stack([tv[key] for tv in tvs]).double()
            x = {"uncentered": x, "centered": x - x.mean(0), "sum": x.sum(0)[None]}[kind]
            rows += [analysis.spectrum_summary(s, energy_top) for s in torch.linalg.svdvals(x)]
        want = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        assert got[kind] == pytest.approx(want, rel=1e-6), kind


def test_null_directions_carry_no_interference():
    """Rank-one tasks with two directions each: the second has singular value 0 and arbitrary
    singular vectors in an SVD; it counts as absent (zero vectors), as if d were 1."""
    g = torch.Generator().manual_seed(5)
    stack = torch.stack([torch.outer(torch.randn(6, generator=g), torch.randn(4, generator=g))
                         for _ in range(2)])  # (2, 6, 4): r = 4, d = 2  # fmt: skip
    _, (sti, _) = analysis._key_spectra(stack)
    u, s, vh = torch.linalg.svd(stack.double(), full_matrices=False)
    assert sti == pytest.approx(analysis.singular_task_interference(u, s, vh, d=1)[0], rel=1e-6)
    assert sti > 0


def test_interference_enters_the_spectra_summary_only_for_two_or_more_tasks():
    m = {"m": torch.randn(6, 5, generator=torch.Generator().manual_seed(0))}
    assert "singular_task_interference" not in analysis.spectra([m], [0.1])
    two = analysis.spectra([m, {"m": m["m"].flip(0)}], [0.1])
    assert two["singular_task_interference"]["relative"] > 0


# ---------------------------------------------------------------- redundancy


def test_thresholds_match_the_ties_order_statistic_on_both_paths():
    g = torch.Generator().manual_seed(1)
    for n in (1000, 700_000):  # sort path and streaming radix path (> 2**20 values in all)
        tvs = [{"a": torch.randn(n // 2, generator=g), "b": torch.randn(n - n // 2, generator=g)}
               for _ in range(2)]  # fmt: skip
        got = analysis.magnitude_thresholds(tvs, [0.1, 1.0])
        for row, t in zip(got, tvs, strict=True):
            flat = torch.cat([t["a"], t["b"]]).abs()
            assert row[0] == flat.kthvalue(n - int(n * 0.1)).values.item()
            assert row[1] == 0.0
            assert int((flat > row[0]).sum()) == int(n * 0.1)


def test_identical_vectors_overlap_fully_without_sign_conflicts():
    v = tv(w=[float(i) * (-1) ** i for i in range(1, 21)])
    result = analysis.redundancy([v, v], [0.1, 0.5])
    for level in ("top10%", "top50%"):
        assert result[level]["jaccard"] == pytest.approx(1.0)
        assert result[level]["overlap"] == pytest.approx(1.0)
        assert result[level]["sign_conflict"] == 0.0
        assert result[level]["sign_conflict_pairwise"] == 0.0
    assert result["top10%"]["selfish"] == 0.0
    assert result["top10%"]["unused"] == pytest.approx(0.9)


def test_opposite_vectors_conflict_everywhere():
    v = tv(w=[1.0, -2.0, 3.0, -4.0])
    result = analysis.redundancy([v, vectors.scale(v, -0.5)], [0.5])
    assert result["all"]["sign_conflict"] == 1.0
    assert result["all"]["sign_conflict_of_all"] == 1.0
    assert result["top50%"]["sign_conflict_pairwise"] == 1.0


def test_disjoint_supports_have_zero_jaccard_and_are_all_selfish():
    result = analysis.redundancy([basis(0), basis(1), basis(2)], [0.25])
    assert result["top25%"]["jaccard"] == 0.0
    assert result["top25%"]["selfish"] == pytest.approx(0.75)
    assert result["top25%"]["unused"] == pytest.approx(0.25)
    assert math.isnan(result["all"]["sign_conflict"])  # no coordinate kept by two tasks
    assert result["magmax_winner_share"] == pytest.approx([1 / 3] * 3)


def test_mass_share_and_sign_conflicts_by_number_of_tasks():
    ramp = tv(w=[float(i) for i in range(1, 101)])
    share = analysis.redundancy([ramp, ramp], [0.1])["top10%"]["mass_share"]
    assert share == pytest.approx(sum(range(91, 101)) / sum(range(1, 101)))
    a, b, c = tv(w=[1.0, 1.0, 1.0]), tv(w=[1.0, 1.0, -1.0]), tv(w=[-1.0, 1.0, 1.0])
    by_tasks = analysis.redundancy([a, b, c], [0.5])["all"]["sign_conflict_by_tasks"]
    assert by_tasks == pytest.approx([1 / 3, 2 / 3])  # tasks {a, b}: w[2]; {a, b, c}: w[0], w[2]


def test_magmax_provenance_gives_ties_to_the_later_task():
    result = analysis.redundancy([tv(w=[2.0, 1.0, 0.0]), tv(w=[-2.0, 0.5, 0.0])], [0.5])
    assert result["magmax_winner_share"] == pytest.approx([0.5, 0.5])  # w[0] tie -> task 2


def test_independent_random_masks_overlap_at_the_independence_baseline():
    g = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(200_000, generator=g)} for _ in range(3)]
    level = analysis.redundancy(tvs, [0.2])["top20%"]
    assert level["jaccard"] == pytest.approx(level["jaccard_if_independent"], rel=0.03)
    assert level["overlap"] == pytest.approx(0.2, rel=0.03)
    assert level["sign_conflict_pairwise"] == pytest.approx(0.5, abs=0.02)


# ---------------------------------------------------------------- describe and bad input


def test_single_task_reports_norms_and_spectra_and_says_pairwise_needs_two():
    m = {"m": torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), "b": torch.ones(3)}
    result = analysis.describe([m])
    assert result["note"] == analysis.PAIRWISE_NOTE
    assert result["correlation"] == {"norms": [pytest.approx(float(torch.cat(
        [m["m"].flatten(), m["b"]]).norm()))]}  # fmt: skip
    assert "uncentered" in result["spectra"] and "redundancy" not in result


def test_describe_on_lazy_files_matches_in_memory(tmp_path):
    g = torch.Generator().manual_seed(3)
    states = [{"transformer.resblocks.0.attn.out_proj.weight": torch.randn(6, 6, generator=g),
               "ln_pre.weight": torch.randn(6, generator=g)} for _ in range(3)]  # fmt: skip
    for i, s in enumerate(states):
        vectors.save(s, tmp_path / f"{i}.safetensors")
    files = [vectors.SafetensorsFile(tmp_path / f"{i}.safetensors") for i in range(3)]
    lazy, eager = analysis.describe(files), analysis.describe(states)
    assert lazy["correlation"]["cosine_mean_off_diagonal"] == pytest.approx(
        eager["correlation"]["cosine_mean_off_diagonal"]
    )
    assert lazy["redundancy"]["top10%"]["jaccard"] == eager["redundancy"]["top10%"]["jaccard"]
    assert lazy["spectra"]["uncentered"] == pytest.approx(eager["spectra"]["uncentered"])


def test_mismatched_task_vectors_fail_naming_the_keys_and_shapes():
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        analysis.describe([tv(a=[1.0], b=[2.0]), tv(a=[1.0])])
    with pytest.raises(ValueError, match=r"a: \(2,\) vs \(1,\)"):
        analysis.describe([tv(a=[1.0]), tv(a=[1.0, 2.0])])
    with pytest.raises(ValueError, match="at least one task vector"):
        analysis.describe([])


@pytest.mark.parametrize("bad", [[0.0], [1.5], [], ["10%"]])
def test_bad_top_k_fractions_are_named(bad):
    with pytest.raises(ValueError, match=r"top-k fractions must lie in \(0, 1\]"):
        analysis.describe([basis(0), basis(1)], topk=bad)


# ---------------------------------------------------------------- the analyze stage


def write_setup(root, tasks: dict[str, list[dict]], n_tasks: int = 2, domains=("plain", "noisy")):
    """A params.yaml and task-vector files laid out as the pipeline writes them."""
    import yaml

    params = {"setups": {"multitask": {"dataset": "digits",
                                       "tasks": tasks.get("multitask_names", ["digits"])},
                         "continual": {"dataset": "digits", "class_order": list(range(10)),
                                       "n_tasks": n_tasks},
                         "domains": {"dataset": "digits", "domains": list(domains)}},
              "analysis": {"topk": [0.1, 0.5], "energy_top": [0.1]}}  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for unit, states in tasks.items():
        if unit == "multitask_names":
            continue
        names = params["setups"]["multitask"]["tasks"] if unit == "multitask" else [
            f"split{i}" for i in range(len(states))]  # fmt: skip
        for name, state in zip(names, states, strict=True):
            vectors.save(state, root / "tv" / unit / f"{name}.safetensors")


def run_stage(setup: str) -> None:
    from stages import analyze

    analyze.main(["--setup", setup, "--task-vectors-dir", "tv", "--out", f"out/{setup}.json",
                  "--plots-dir", f"plots/{setup}"])  # fmt: skip


def random_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"transformer.resblocks.0.mlp.c_fc.weight": torch.randn(8, 4, generator=g),
            "transformer.resblocks.0.ln_1.weight": torch.randn(4, generator=g)}  # fmt: skip


def test_stage_compares_individual_and_sequential_with_files_for_dvc_plots(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    steps = [random_state(i) for i in range(3)]
    chain = [steps[0], vectors.add(steps[0], steps[1]), vectors.add(vectors.add(*steps[:2]),
                                                                    steps[2])]  # fmt: skip
    write_setup(tmp_path, {"continual": [random_state(10 + i) for i in range(3)],
                           "continual_sequential": chain}, n_tasks=3)  # fmt: skip
    run_stage("continual")
    metrics = json.loads((tmp_path / "out/continual.json").read_text())
    assert set(metrics) == {"individual", "sequential", "sequential_increments"}
    seq = metrics["sequential"]["correlation"]["cosine_mean_off_diagonal"]
    assert seq > metrics["individual"]["correlation"]["cosine_mean_off_diagonal"]
    assert set(metrics["individual"]["correlation"]["norms"]) == {"split0", "split1", "split2"}
    csv_header = (tmp_path / "plots/continual/layers.csv").read_text().splitlines()[0]
    assert csv_header.startswith("depth,layer,individual,sequential,sequential_increments")
    for name in ("cosine", "layers", "spectra", "redundancy"):
        assert (tmp_path / f"plots/continual/{name}.png").read_bytes()[:4] == b"\x89PNG"
    cosine_rows = (tmp_path / "plots/continual/cosine.csv").read_text().splitlines()
    assert len(cosine_rows) == 1 + 3 * 9  # header + three 3x3 matrices


def test_stage_with_one_task_writes_norms_and_spectra_and_says_why(tmp_path, monkeypatch, caplog):
    import json

    monkeypatch.chdir(tmp_path)
    write_setup(tmp_path, {"multitask": [random_state(0)]})
    run_stage("multitask")
    metrics = json.loads((tmp_path / "out/multitask.json").read_text())["individual"]
    assert metrics["note"] == analysis.PAIRWISE_NOTE
    assert set(metrics["correlation"]) == {"norms"} and "uncentered" in metrics["spectra"]
    assert analysis.PAIRWISE_NOTE in caplog.text
    for name in ("cosine", "layers", "spectra", "redundancy"):  # every declared output exists
        assert (tmp_path / f"plots/multitask/{name}.csv").exists()
        assert (tmp_path / f"plots/multitask/{name}.png").exists()


def test_stage_names_mismatched_task_vector_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = {"transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(8, 5),
           "transformer.resblocks.0.ln_1.weight": torch.zeros(4)}  # fmt: skip
    write_setup(tmp_path, {"multitask": [random_state(0), bad],
                           "multitask_names": ["digits", "parity"]})  # fmt: skip
    with pytest.raises(ValueError, match=r"parity.safetensors has 1 shape mismatch.*\(8, 5\)"):
        run_stage("multitask")
    assert not (tmp_path / "out").exists()


def test_stage_analyses_on_the_runtime_device(tmp_path, monkeypatch):
    """describe runs inside compute_on(MERGELOOM_DEVICE); an absent device stops the stage."""
    from mergeloom import device
    from stages import analyze

    monkeypatch.chdir(tmp_path)
    write_setup(tmp_path, {"multitask": [random_state(0), random_state(1)],
                           "multitask_names": ["digits", "parity"]})  # fmt: skip
    asked, seen, describe = [], [], analysis.describe

    def spy_describe(tvs, **kw):
        seen.append(device.compute_device())
        return describe(tvs, **kw)

    def spy_compute_on(name):
        asked.append(name)
        return device.compute_on(name)

    monkeypatch.setattr(analysis, "describe", spy_describe)
    monkeypatch.setattr(analyze, "compute_on", spy_compute_on)
    monkeypatch.setenv("MERGELOOM_DEVICE", "cpu")
    run_stage("multitask")
    assert asked == ["cpu"] and seen == [torch.device("cpu")]
    if not torch.cuda.is_available():
        monkeypatch.setenv("MERGELOOM_DEVICE", "cuda")
        with pytest.raises(ValueError, match="'cuda' asked for, but torch.cuda.is_available"):
            run_stage("multitask")
        assert seen == [torch.device("cpu")]  # nothing was analysed


def numbers(node: object) -> list[float]:
    """Every number of a describe() result, in a fixed order (tensors must be on the CPU)."""
    if isinstance(node, dict):
        return [x for k in sorted(node, key=str) for x in numbers(node[k])]
    if isinstance(node, list | tuple):
        return [x for v in node for x in numbers(v)]
    if isinstance(node, torch.Tensor):
        assert node.device.type == "cpu"
        return node.flatten().tolist()
    return [node] if isinstance(node, int | float) else []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_describe_on_cuda_matches_the_cpu(task_vectors):
    from mergeloom.device import compute_on

    cpu = analysis.describe(task_vectors)
    with compute_on("cuda"):
        cuda = analysis.describe(task_vectors)
    assert numbers(cuda) == pytest.approx(numbers(cpu), rel=1e-5, abs=1e-9, nan_ok=True)
