"""Contract tests over the registry plus one hand-computed example and the invariants of each
method (docs/methods.md#tests)."""

import copy
import inspect

import pytest
import torch
from conftest import vit_like

from mergeloom import methods, stats, vectors
from mergeloom.methods import METHODS

ALL = sorted(METHODS)
SEEDED = [n for n in ALL if "seed" in inspect.signature(METHODS[n]).parameters]


def vec(*values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def close(a, b, **kw):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **kw)


# ---------------------------------------------------------------- contract, every method


@pytest.mark.parametrize("name", ALL)
def test_keys_shapes_dtype_finite(name, task_vectors):
    merged = METHODS[name](task_vectors)
    assert list(merged) == list(task_vectors[0])
    for key, value in merged.items():
        assert value.shape == task_vectors[0][key].shape, key
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", ALL)
def test_inputs_not_mutated(name, task_vectors):
    before = copy.deepcopy(task_vectors)
    METHODS[name](task_vectors)
    for tv, original in zip(task_vectors, before, strict=True):
        for key in tv:
            assert torch.equal(tv[key], original[key])


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name, task_vectors):
    close(METHODS[name](task_vectors), METHODS[name](task_vectors), rtol=0, atol=0)


@pytest.mark.parametrize("name", SEEDED)
def test_seed_changes_result(name, task_vectors):
    a = METHODS[name](task_vectors, seed=1)
    b = METHODS[name](task_vectors, seed=2)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ALL)
def test_lazy_files_give_the_same_result(name, task_vectors, tmp_path):
    """The streaming path (one key per read from safetensors) equals the in-memory path."""
    base = vit_like(100)
    vectors.save(base, tmp_path / "base.safetensors")
    paths = []
    for i, tv in enumerate(task_vectors):
        paths.append(tmp_path / f"e{i}.safetensors")
        vectors.save(vectors.apply(base, tv), paths[-1])
    lazy = vectors.load_task_vectors(tmp_path / "base.safetensors", paths)
    in_memory = [vectors.subtract(vectors.load(p), base) for p in paths]
    close(METHODS[name](lazy), METHODS[name](in_memory), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_lam_linearity_is_declared_correctly(name, task_vectors):
    at = {lam: METHODS[name](task_vectors, lam=lam) for lam in (0.0, 1.0, 2.0)}
    if name in methods.LAMBDA_LINEAR:
        close(at[2.0], vectors.scale(at[1.0], 2.0), rtol=1e-5, atol=1e-6)
    else:  # affine: equal steps in lam give equal steps in the output
        step = vectors.subtract(at[1.0], at[0.0])
        close(vectors.subtract(at[2.0], at[1.0]), step, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_unknown_hyperparameter_is_a_type_error(name, task_vectors):
    with pytest.raises(TypeError, match="densty"):
        METHODS[name](task_vectors, densty=0.2)


@pytest.mark.parametrize("name", ALL)
def test_bad_lam_and_empty_input(name, task_vectors):
    with pytest.raises(ValueError, match=rf"{name}: lam must be a finite number, got nan"):
        METHODS[name](task_vectors, lam=float("nan"))
    with pytest.raises(ValueError, match="at least one task vector"):
        METHODS[name]([])


@pytest.mark.parametrize("name", ALL)
def test_mismatched_task_vectors_are_rejected(name, task_vectors):
    broken = dict(task_vectors[1])
    broken["proj"] = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=r"task vector 1 .*proj: \(4, 6\) vs \(6, 4\)"):
        METHODS[name]([task_vectors[0], broken])


def test_get_unknown_lists_known():
    with pytest.raises(ValueError, match="unknown merge method 'nope'; known: breadcrumbs, cart"):
        methods.get("nope")


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("ties", {"k": 0.0}, r"ties: k must be in \(0.0, 1.0\], got 0.0"),
        ("ties", {"k": 20}, r"ties: k must be in \(0.0, 1.0\], got 20"),
        ("ties", {"merge": "median"}, r"merge must be one of \['mean', 'sum', 'max'\]"),
        ("ties", {"scope": "layer"}, r"scope must be one of \['global', 'per_tensor'\]"),
        ("dare", {"p": 1.0}, r"dare: p must be in \[0.0, 1.0\), got 1.0"),
        ("dare", {"base": "magmax"}, r"base must be one of \['task_arithmetic', 'ties'\]"),
        ("breadcrumbs", {"density": 1.5}, r"density must be in \(0.0, 1.0\], got 1.5"),
        ("breadcrumbs", {"gamma": -0.1}, r"gamma must be in \[0.0, 1.0\), got -0.1"),
        ("breadcrumbs", {"scope": "global"}, r"scope must be one of \['row', 'tensor'\]"),
        ("ties", {"frozen_zeros": -1}, r"ties: frozen_zeros must be an integer >= 0, got -1"),
        ("ties", {"frozen_zeros": 3, "scope": "per_tensor"}, r"frozen_zeros needs scope='global'"),
        ("pcb", {"frozen_zeros": 1.5}, r"pcb: frozen_zeros must be an integer >= 0, got 1.5"),
        ("pcb", {"ratio": 0.0}, r"pcb: ratio must be in \(0.0, 1.0\], got 0.0"),
        ("pcb", {"clip": 0.5}, r"pcb: clip must be in \[0.0, 0.5\), got 0.5"),
        ("iso_cts", {"common_space_fraction": 1.2}, r"common_space_fraction must be in \[0.0"),
        ("cart", {"rank_ratio": 0.0}, r"cart: rank_ratio must be in \(0.0, 1.0\], got 0.0"),
        ("cart", {"rank_ratio": 2}, r"cart: rank_ratio must be in \(0.0, 1.0\], got 2"),
        ("consensus", {"k": -1}, r"consensus: k must be an integer >= 0, got -1"),
    ],
)
def test_out_of_range_hyperparameters(name, kwargs, message, task_vectors):
    with pytest.raises(ValueError, match=message):
        METHODS[name](task_vectors, **kwargs)


@pytest.mark.parametrize(
    "name",
    [
        "task_arithmetic",
        "ties",
        "magmax",
        "breadcrumbs",
        "pcb",
        "tsv_m",
        "weight_averaging",
        "random_mix",
        "dare",
        "consensus",
    ],
)
def test_one_expert_at_lam_one_comes_back(name):
    tv = vit_like(5)
    kwargs = {
        "ties": {"k": 1.0},
        "breadcrumbs": {"density": 1.0, "gamma": 0.0},
        "pcb": {"ratio": 1.0, "clip": 0.0},
        "dare": {"p": 0.0},
        "consensus": {"k": 1},
    }.get(name, {})
    merged = METHODS[name]([tv], lam=1.0, **kwargs)
    if name == "pcb":  # the entry of smallest balance weight gets weight 0: exactly one is lost
        lost = sum(int((~torch.isclose(merged[k], tv[k])).sum()) for k in tv)
        assert lost == 1
        return
    close(merged, tv, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- averaging family


def test_weight_averaging_is_task_arithmetic_at_one_over_t(task_vectors):
    close(
        methods.weight_averaging(task_vectors),
        methods.task_arithmetic(task_vectors, lam=1 / 3),
        rtol=1e-6,
        atol=1e-6,
    )


def test_task_arithmetic_golden():
    merged = methods.task_arithmetic([vec(1, 2), vec(3, -4)], lam=0.5)
    assert merged["w"].tolist() == [2.0, -1.0]


# ---------------------------------------------------------------- TIES


TIES_INPUT = [vec(3, -1, 0.5, 2), vec(-2, -4, 1, 0), vec(1, 2, -3, 0.1)]


def test_ties_golden_reference_threshold():
    # k=0.5, d=4: threshold = 2nd smallest |tau| (reference kthvalue(d - int(d*k))) = 1,
    # kept |tau| >= 1: [3,-1,0,2], [-2,-4,1,0], [1,2,-3,0]; sum [2,-3,-2,2] elects [+,-,-,+];
    # dis-mean of agreeing entries: (3+1)/2, (-1-4)/2, -3, 2.
    merged = methods.ties(TIES_INPUT, lam=1.0, k=0.5)
    assert merged["w"].tolist() == [2.0, -2.5, -3.0, 2.0]


def test_ties_sum_and_max_variants():
    assert methods.ties(TIES_INPUT, k=0.5, merge="sum")["w"].tolist() == [4.0, -5.0, -3.0, 2.0]
    assert methods.ties(TIES_INPUT, k=0.5, merge="max")["w"].tolist() == [3.0, -4.0, -3.0, 2.0]


def test_ties_zero_sum_coordinate_takes_majority_sign():
    # coordinate 0 sums to 0; elected signs elsewhere are (+, +), so the majority sign is +
    merged = methods.ties([vec(1, 2, 3), vec(-1, 1, 1)], lam=1.0, k=1.0)
    assert merged["w"].tolist() == [1.0, 1.5, 2.0]
    negative = methods.ties([vec(1, -2, -3), vec(-1, -1, -1)], lam=1.0, k=1.0)
    assert negative["w"].tolist() == [-1.0, -1.5, -2.0]


def test_ties_zero_sum_with_zero_majority_keeps_negatives():
    # coordinate 0 sums to 0; elected signs elsewhere (+, -) sum to 0, so the majority sign is
    # 0 too; the reference where(sign > 0, x > 0, x < 0) then keeps the negative entry -1.
    merged = methods.ties([vec(1, 2, -3), vec(-1, 0, 0)], lam=1.0, k=1.0)
    assert merged["w"].tolist() == [-1.0, 2.0, -3.0]
    two_negatives = methods.ties([vec(3, 2, -3), vec(-1, 0, 0), vec(-2, 0, 0)], lam=1.0, k=1.0)
    assert two_negatives["w"].tolist() == [-1.5, 2.0, -3.0]  # dis-mean of -1 and -2


def test_ties_frozen_zeros_golden():
    # d=10 real entries 1..10 plus 5 frozen zeros, k=0.2: D=15, threshold = the
    # (15 - int(3)) = 12th smallest of the union = the 7th smallest real magnitude = 7, so
    # 4 of the 10 real entries (40 %) survive; without the zeros the (10 - int(2)) = 8th
    # smallest (8): 3 of 10.
    tv = vec(*range(1, 11))
    frozen = methods.ties([tv], lam=1.0, k=0.2, frozen_zeros=5)["w"].tolist()
    assert frozen == [0.0] * 6 + [7.0, 8.0, 9.0, 10.0]
    assert methods.ties([tv], lam=1.0, k=0.2)["w"].tolist() == [0.0] * 7 + [8.0, 9.0, 10.0]


def with_zeros(tv, n):
    return {**tv, "frozen": torch.zeros(n)}


@pytest.mark.parametrize("name", ["ties", "pcb"])
@pytest.mark.parametrize("sort_below", [None, 0])
def test_frozen_zeros_equal_literally_appended_zeros(name, sort_below, monkeypatch):
    if sort_below is not None:  # also through the radix selection
        monkeypatch.setattr(stats, "_SORT_BELOW", sort_below)
    g = torch.Generator().manual_seed(3)
    tvs = [
        {"a": torch.randn(40, generator=g), "b": torch.randn(3, 7, generator=g)} for _ in range(3)
    ]
    kwargs = {"ties": {"k": 0.3}, "pcb": {"ratio": 0.3, "clip": 0.05}}[name]
    for n in (7, 30, 200):
        counted = METHODS[name](tvs, lam=1.0, frozen_zeros=n, **kwargs)
        appended = METHODS[name]([with_zeros(tv, n) for tv in tvs], lam=1.0, **kwargs)
        for key in counted:
            torch.testing.assert_close(counted[key], appended[key], rtol=1e-6, atol=1e-7)
        assert torch.equal(appended["frozen"], torch.zeros(n))
    kept = METHODS[name](tvs, lam=1.0, frozen_zeros=30, **kwargs)
    plain = METHODS[name](tvs, lam=1.0, **kwargs)
    assert sum(int((v != 0).sum()) for v in kept.values()) > sum(
        int((v != 0).sum()) for v in plain.values()
    )


def test_ties_one_task_k_one_is_task_arithmetic(task_vectors):
    close(
        methods.ties(task_vectors[:1], lam=0.7, k=1.0),
        methods.task_arithmetic(task_vectors[:1], lam=0.7),
    )


def test_ties_same_signs_no_trim_is_mean():
    tvs = [vec(1, 2, 3), vec(3, 4, 5)]
    assert methods.ties(tvs, lam=1.0, k=1.0)["w"].tolist() == [2.0, 3.0, 4.0]


def test_ties_is_positively_homogeneous(task_vectors):
    scaled = [vectors.scale(tv, 3.0) for tv in task_vectors]
    close(
        methods.ties(scaled), vectors.scale(methods.ties(task_vectors), 3.0), rtol=1e-5, atol=1e-6
    )


def test_ties_global_and_per_tensor_differ_as_designed():
    tvs = [{"a": torch.tensor([10.0, 9.0]), "b": torch.tensor([0.1, 0.2])}]
    global_ = methods.ties(tvs, k=0.5)  # d=4: keep |tau| >= 2nd smallest (0.2): 10, 9, 0.2
    per_tensor = methods.ties(tvs, k=0.5, scope="per_tensor")  # per key: both entries kept
    assert global_["b"].tolist() == pytest.approx([0.0, 0.2])
    assert per_tensor["b"].tolist() == pytest.approx([0.1, 0.2])


# ---------------------------------------------------------------- DARE


def test_dare_without_drop_is_task_arithmetic(task_vectors):
    close(
        methods.dare(task_vectors, p=0.0, lam=0.4), methods.task_arithmetic(task_vectors, lam=0.4)
    )


def test_dare_ties_without_drop_is_ties(task_vectors):
    # k = 1: both trim rules keep everything (TIES d - int(d) = 0, MergeLM int(0 d) = 0)
    close(
        methods.dare(task_vectors, p=0.0, base="ties", lam=1.0, k=1.0),
        methods.ties(task_vectors, lam=1.0, k=1.0),
    )


def test_dare_ties_golden_mergelm_threshold_with_ties():
    # d=5, k=0.5, |tau| sorted 1, 1, 2, 3, 4. MergeLM (DARE-TIES): threshold = the
    # int(5 * 0.5) = 2nd smallest = 1, so both entries tied at it are kept (all five).
    # TIES: the (5 - int(2.5)) = 3rd smallest = 2: keeps 2, -3, 4.
    tv = vec(1, -1, 2, -3, 4)
    assert methods.dare([tv], p=0.0, base="ties", lam=1.0, k=0.5)["w"].tolist() == [
        1.0,
        -1.0,
        2.0,
        -3.0,
        4.0,
    ]
    assert methods.ties([tv], lam=1.0, k=0.5)["w"].tolist() == [0.0, 0.0, 2.0, -3.0, 4.0]


def test_dare_ties_zero_elected_sign_keeps_nothing():
    # as the TIES test below, but MergeLM's disjoint merge keeps no entry where the sign is 0
    merged = methods.dare([vec(1, 2, -3), vec(-1, 0, 0)], p=0.0, base="ties", lam=1.0, k=1.0)
    assert merged["w"].tolist() == [0.0, 2.0, -3.0]


def test_dare_is_unbiased_over_seeds():
    tv = {"w": torch.linspace(-1, 1, 200)}
    mean = sum(methods.dare([tv], lam=1.0, p=0.5, seed=s)["w"] for s in range(400)) / 400
    torch.testing.assert_close(mean, tv["w"], atol=0.25, rtol=0)
    single = methods.dare([tv], lam=1.0, p=0.5, seed=0)["w"]
    kept = single != 0
    assert 0.35 < kept.float().mean() < 0.65
    torch.testing.assert_close(single[kept], 2 * tv["w"][kept])  # rescaled by 1/(1-p)


def test_dare_masks_ignore_key_order(task_vectors):
    reordered = [dict(reversed(list(tv.items()))) for tv in task_vectors]
    a, b = methods.dare(task_vectors, seed=3), methods.dare(reordered, seed=3)
    for key in a:
        assert torch.equal(a[key], b[key])


# ---------------------------------------------------------------- Breadcrumbs


def test_breadcrumbs_golden():
    # n=10, density 0.8, gamma 0.1: drop the largest 1 and the smallest 1
    tv = vec(*range(1, 11))
    merged = methods.breadcrumbs([tv], lam=1.0, density=0.8, gamma=0.1)
    assert merged["w"].tolist() == [0.0, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_breadcrumbs_golden_per_row_differs_from_whole_tensor():
    # n=4 per row, density 0.5, gamma 0.25: per row drop int(1) largest, keep int(2) of the rest
    tv = {"w": torch.tensor([[1.0, 2, 3, 4], [10, 20, 30, 40]])}
    row = methods.breadcrumbs([tv], lam=1.0, density=0.5, gamma=0.25)
    assert row["w"].tolist() == [[0.0, 2, 3, 0], [0, 20, 30, 0]]
    # whole tensor (n=8): drop the 2 largest (30, 40) and the 2 smallest (1, 2)
    tensor = methods.breadcrumbs([tv], lam=1.0, density=0.5, gamma=0.25, scope="tensor")
    assert tensor["w"].tolist() == [[0.0, 0, 3, 4], [10, 20, 0, 0]]


def test_breadcrumbs_golden_int_counts():
    # n=5, density 0.5: the authors keep int(2.5) = 2 entries; the whole-tensor variant drops
    # round(2.5) = 2 from the bottom and keeps 3
    merged = methods.breadcrumbs([vec(1, 2, 3, 4, 5)], lam=1.0, density=0.5, gamma=0.0)
    assert merged["w"].tolist() == [0.0, 0, 0, 4, 5]
    by_tensor = methods.breadcrumbs(
        [vec(1, 2, 3, 4, 5)], lam=1.0, density=0.5, gamma=0.0, scope="tensor"
    )
    assert by_tensor["w"].tolist() == [0.0, 0, 3, 4, 5]


def test_breadcrumbs_leaves_0d_tensors_alone():
    tvs = [{"s": torch.tensor(2.5)}, {"s": torch.tensor(-1.0)}]
    assert methods.breadcrumbs(tvs, lam=1.0)["s"].item() == 1.5  # not masked: 2.5 - 1
    # the whole-tensor variant ranks the single entry into the dropped bottom band
    assert methods.breadcrumbs(tvs, lam=1.0, scope="tensor")["s"].item() == 0.0


def test_breadcrumbs_full_density_is_task_arithmetic(task_vectors):
    close(
        methods.breadcrumbs(task_vectors, lam=0.3, density=1.0, gamma=0.0),
        methods.task_arithmetic(task_vectors, lam=0.3),
    )


def test_breadcrumbs_retained_count_per_row(task_vectors):
    merged = methods.breadcrumbs(task_vectors[:1], lam=1.0, density=0.7, gamma=0.05)
    for key, value in merged.items():
        if value.dim() == 0:
            assert torch.equal(value, task_vectors[0][key]), key
            continue
        n = value.shape[-1]
        kept = (value != 0).sum(-1)
        assert (kept == min(int(0.7 * n), n - int(0.05 * n))).all(), key


def test_breadcrumbs_retained_fraction_per_tensor(task_vectors):
    merged = methods.breadcrumbs(task_vectors[:1], lam=1.0, density=0.7, gamma=0.05, scope="tensor")
    for key, value in merged.items():
        n = value.numel()
        assert abs(int((value != 0).sum()) - 0.7 * n) <= 1, key


# ---------------------------------------------------------------- MagMax, random mix


def test_magmax_golden_later_task_wins_ties_and_sign_kept():
    merged = methods.magmax([vec(3, -1, 2), vec(-4, 1, -2)], lam=1.0)
    assert merged["w"].tolist() == [-4.0, 1.0, -2.0]


def test_magmax_identical_experts(task_vectors):
    close(methods.magmax([task_vectors[0]] * 3, lam=1.0), task_vectors[0])


def test_random_mix_picks_inputs_and_ignores_key_order(task_vectors):
    merged = methods.random_mix(task_vectors, lam=1.0, seed=4)
    for key, value in merged.items():
        stack = torch.stack([tv[key] for tv in task_vectors])
        assert ((stack == value).any(dim=0)).all(), key
    reordered = [dict(reversed(list(tv.items()))) for tv in task_vectors]
    close(methods.random_mix(reordered, lam=1.0, seed=4), merged, rtol=0, atol=0)


def test_random_mix_uses_every_task():
    tvs = [{"w": torch.full((1000,), float(t))} for t in range(4)]
    counts = torch.bincount(methods.random_mix(tvs, lam=1.0)["w"].long(), minlength=4)
    assert (counts > 200).all()


# ---------------------------------------------------------------- PCB


def test_pcb_single_task_keeps_top_ratio():
    # one task: balance weights are monotone in |tau|. The drop floor is the balance weight of
    # 0-based rank int(5 * 0.6) = 3 (|tau| = 4), which gets weight 0 itself: only -5 survives.
    # (The interpolated 0.6-quantile would sit between ranks 2 and 3 and keep 4 as well.)
    merged = methods.pcb([vec(1, -5, 3, -2, 4)], lam=1.0, ratio=0.4, clip=0.0)
    assert merged["w"].tolist() == [0.0, -5.0, 0.0, 0.0, 0.0]


def test_pcb_clip_bounds_are_ranks_golden():
    # d=101, clip 0.01: bounds at 0-based ranks int(1.01) = 1 and int(101 * 0.99 - 1) = 98,
    # i.e. |tau| clipped to [2, 99] (interpolated quantiles: [2, 100]). ratio 1: floor = the
    # smallest balance weight (0, at |tau| <= 2), so 1 and 2 get weight 0.
    merged = methods.pcb([vec(*range(1, 102))], lam=1.0, ratio=1.0, clip=0.01)
    expected = [0.0, 0.0, *range(3, 99), 99.0, 99.0, 99.0]
    torch.testing.assert_close(merged["w"], torch.tensor(expected, dtype=torch.float32))


def test_pcb_no_nan_with_an_all_zero_expert(task_vectors):
    zero = {k: torch.zeros_like(v) for k, v in task_vectors[0].items()}
    merged = methods.pcb([zero, *task_vectors[1:]])
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_pcb_keeps_about_ratio_of_entries_per_task():
    tv = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(0))}
    merged = methods.pcb([tv], lam=1.0, ratio=0.1)
    assert abs(int((merged["w"] != 0).sum()) - 100) <= 1


# ---------------------------------------------------------------- spectral family


def diag_tv(*values, key="w"):
    return {key: torch.diag(torch.tensor(values, dtype=torch.float32)), "b": torch.tensor(values)}


def test_tsv_orthogonal_tasks_sum_and_others_average():
    merged = methods.tsv_m([diag_tv(2.0, 0.0), diag_tv(0.0, 3.0)], lam=1.0)
    torch.testing.assert_close(merged["w"], torch.diag(torch.tensor([2.0, 3.0])))
    torch.testing.assert_close(merged["b"], torch.tensor([1.0, 1.5]))


def test_tsv_rank_below_task_count_merges_to_zero():
    tvs = [{"w": torch.randn(2, 5)} for _ in range(3)]  # r = 2 < 3 tasks: d = 0
    assert torch.equal(methods.tsv_m(tvs)["w"], torch.zeros(2, 5))


def test_iso_c_golden_and_flat_spectrum(task_vectors):
    merged = methods.iso_c([diag_tv(2.0, 0.0), diag_tv(0.0, 4.0)], lam=1.0)
    torch.testing.assert_close(merged["w"], torch.diag(torch.tensor([3.0, 3.0])))
    torch.testing.assert_close(merged["b"], torch.tensor([1.0, 2.0]))
    flat = methods.iso_c(task_vectors, lam=1.0)
    for key, value in flat.items():
        if value.dim() == 2:
            s = torch.linalg.svdvals(value)
            total = torch.linalg.svdvals(sum(tv[key] for tv in task_vectors))
            torch.testing.assert_close(s, torch.full_like(s, total.mean().item()))


def test_iso_cts_flat_spectrum_and_full_common_space_is_iso_c(task_vectors):
    merged = methods.iso_cts(task_vectors, lam=1.0)
    for key, value in merged.items():
        if value.dim() == 2:
            s = torch.linalg.svdvals(value)
            torch.testing.assert_close(s, torch.full_like(s, s.mean().item()), rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(value, sum(tv[key] for tv in task_vectors) / 3)
    close(
        methods.iso_cts(task_vectors, common_space_fraction=1.0),
        methods.iso_c(task_vectors),
        rtol=1e-4,
        atol=1e-5,
    )


def test_cart_golden():
    key = "blocks.0.attn.w"
    tvs = [diag_tv(6, 0, key=key), diag_tv(0, 6, key=key), diag_tv(3, 0, key=key)]
    # mean diag(3,2); centred diag(3,-2), diag(-3,4), diag(0,-2); rank-1 parts diag(3,0),
    # diag(0,4), diag(0,-2) sum to diag(3,2); lam 1 -> diag(6,4). "b" is not attn/mlp: mean.
    merged = methods.cart(tvs, lam=1.0, rank_ratio=0.5)
    torch.testing.assert_close(merged[key], torch.diag(torch.tensor([6.0, 4.0])))
    torch.testing.assert_close(merged["b"], torch.tensor([3.0, 2.0]))


@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_cart_full_rank_or_zero_lam_is_weight_averaging(task_vectors, lam):
    average = methods.weight_averaging(task_vectors)
    close(methods.cart(task_vectors, lam=lam, rank_ratio=1.0), average, rtol=1e-4, atol=1e-5)
    close(methods.cart(task_vectors, lam=0.0), average)


def test_cart_only_touches_attention_and_mlp_weights(task_vectors):
    merged, average = methods.cart(task_vectors), methods.weight_averaging(task_vectors)
    changed = sorted(k for k in merged if not torch.allclose(merged[k], average[k]))
    assert changed == [
        "transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.mlp.c_fc.weight",
    ]


# ---------------------------------------------------------------- Consensus


def test_consensus_golden_drops_selfish_weights():
    # coordinate 0 is used by tasks 1-2 (kept); coordinate 1 only by task 1 (selfish, dropped)
    merged = methods.consensus([vec(1, 3), vec(1, 0.1), vec(0.1, 0.1)], lam=1.0)
    torch.testing.assert_close(merged["w"], torch.tensor([2.1, 0.0]))


def test_consensus_k_zero_is_ta_and_k_above_t_is_zero(task_vectors):
    close(methods.consensus(task_vectors, k=0), methods.task_arithmetic(task_vectors))
    assert all(
        torch.equal(v, torch.zeros_like(v)) for v in methods.consensus(task_vectors, k=4).values()
    )


@pytest.mark.parametrize("name", ["ties", "pcb"])
def test_global_statistics_identical_on_the_streaming_path(name, task_vectors, monkeypatch):
    """Below 2**20 values a plain sort is used; the radix selection must give the same merge."""
    sorted_path = METHODS[name](task_vectors)
    monkeypatch.setattr(stats, "_SORT_BELOW", 0)
    close(METHODS[name](task_vectors), sorted_path, rtol=0, atol=0)


@pytest.mark.parametrize(("density", "gamma"), [(0.8, 0.1), (0.5, 0.0), (0.9, 0.2), (1.0, 0.0)])
def test_breadcrumbs_band_matches_stable_ranking_with_ties(density, gamma):
    values = torch.randint(-3, 4, (257,), generator=torch.Generator().manual_seed(1)).float()
    n = values.numel()
    if gamma >= 1 - density:
        n_top, n_bottom = round((1 - density) * n), 0
    else:
        n_top, n_bottom = round(gamma * n), round((1 - density - gamma) * n)
    ranks = torch.empty(n, dtype=torch.long)
    ranks[values.abs().argsort(stable=True)] = torch.arange(n)
    expected = (ranks >= n_bottom) & (ranks < n - n_top)
    assert torch.equal(methods._band_mask(values, density, gamma), expected)


# ---------------------------------------------------------------- exact fast paths (issue 13)
# The spectral methods take their leading singular triplets and polar factors from float64
# eigendecompositions of Gram matrices, PCB streams cache-sized chunks and Breadcrumbs masks
# in place: they must give the authors' direct algorithms' merges (below: the code before).


def _authors_polar(matrix):
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def _authors_matrix_merge(name, stack, lam=1.0):
    """A spectral method's merge of one 2-D key as the authors compute it: full SVDs."""
    n_tasks = len(stack)
    if name == "tsv_m":
        d = min(stack.shape[1:]) // n_tasks
        u, s, vh = torch.linalg.svd(stack, full_matrices=False)
        u_cat = torch.cat(list(u[:, :, :d]), dim=1)
        vh_cat = torch.cat(list(vh[:, :d, :]), dim=0)
        return (
            lam * _authors_polar(u_cat) @ torch.diag(s[:, :d].reshape(-1)) @ _authors_polar(vh_cat)
        )
    if name == "iso_c":
        u, s, vh = torch.linalg.svd(stack.sum(0), full_matrices=False)
        return lam * s.mean() * (u @ vh)
    if name == "iso_cts":  # common_space_fraction 0.8
        r = min(stack.shape[1:])
        common = int(r * 0.8)
        specific = min(round((r - common) / n_tasks) * n_tasks, (r // n_tasks) * n_tasks)
        common, d = r - specific, specific // n_tasks
        u, s, vh = torch.linalg.svd(stack.sum(0), full_matrices=False)
        u_c, vh_c = u[:, :common], vh[:common]
        u_t, s_t, vh_t = torch.linalg.svd(stack - u_c @ (u_c.T @ stack), full_matrices=False)
        u_all = torch.cat([*u_t[:, :, :d], u_c], dim=1)
        vh_all = torch.cat([*vh_t[:, :d, :], vh_c], dim=0)
        sigma = torch.cat([s_t[:, :d].reshape(-1), s[:common]]).mean()
        return lam * sigma * (_authors_polar(u_all) @ _authors_polar(vh_all))
    mean = stack.mean(0)  # cart, rank_ratio 0.12
    rank = max(1, int(0.12 * min(stack.shape[1:])))
    u, s, vh = torch.linalg.svd(stack - mean, full_matrices=False)
    return mean + lam * ((u[:, :, :rank] * s[:, None, :rank]) @ vh[:, :rank, :]).sum(0)


SPECTRAL = ["tsv_m", "iso_c", "iso_cts", "cart"]
MATRIX_KEY = "blocks.0.attn.in_proj_weight"  # a CART key too


def spectral_problem(n_tasks, shape, seed, decaying):
    """Task matrices sharing a common part, with a decaying spectrum like fine-tuning
    updates, or Gaussian noise (the benchmark's experts: many near-equal singular values)."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    common = torch.randn(m, n, generator=g)
    tvs = []
    for _ in range(n_tasks):
        if decaying:
            spectrum = torch.logspace(0, -3, r)
            own = torch.randn(m, r, generator=g) @ (
                spectrum[:, None] * torch.randn(r, n, generator=g)
            )
            matrix = own + 0.3 * common
        else:
            matrix = torch.randn(m, n, generator=g)
        tvs.append({MATRIX_KEY: matrix, "b": torch.randn(m, generator=g)})
    return tvs


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32), (6, 50)])
@pytest.mark.parametrize("n_tasks", [3, 4])
@pytest.mark.parametrize("decaying", [True, False])
def test_spectral_methods_equal_the_authors_full_svds(name, shape, n_tasks, decaying):
    tvs = spectral_problem(n_tasks, shape, seed=sum(shape) + n_tasks, decaying=decaying)
    stack = torch.stack([tv[MATRIX_KEY] for tv in tvs])
    merged = METHODS[name](tvs, lam=0.7)
    assert merged[MATRIX_KEY].dtype == torch.float32
    assert relative_error(merged[MATRIX_KEY], _authors_matrix_merge(name, stack, 0.7)) < 1e-4
    # closer still to the same algorithm in float64: the float32 SVD is the larger error
    truth = _authors_matrix_merge(name, stack.double(), 0.7)
    assert relative_error(merged[MATRIX_KEY], truth) < 1e-6
    scale = 1.0 if name == "cart" else 0.7  # CART keeps the plain mean outside its matrices
    torch.testing.assert_close(merged["b"], scale * sum(tv["b"] for tv in tvs) / n_tasks)


def test_top_svd_and_polar_are_a_float64_svd_where_well_conditioned():
    g = torch.Generator().manual_seed(0)
    for shape in [(30, 20), (20, 30)]:
        matrix = torch.randn(shape, generator=g)
        p, s, qh = torch.linalg.svd(matrix.double(), full_matrices=False)
        u, s_k, vh = methods._top_svd(matrix, 5)
        assert u.dtype == s_k.dtype == vh.dtype == torch.float64
        torch.testing.assert_close(s_k, s[:5], rtol=1e-12, atol=0)
        truncated = (p[:, :5] * s[:5]) @ qh[:5]
        torch.testing.assert_close((u * s_k) @ vh, truncated, rtol=0, atol=1e-12)
        torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
        polar, singular_values = methods._polar(matrix)
        torch.testing.assert_close(polar, p @ qh, rtol=0, atol=1e-12)
        torch.testing.assert_close(singular_values, s, rtol=1e-12, atol=0)
        assert methods._top_svd(matrix, 0)[0].shape == (shape[0], 0)


def test_top_svd_and_polar_use_the_svd_below_the_gram_precision():
    # rank 2: the 3rd singular value and the polar factor's null space are not in the Gram's
    # float64 digits; the float32 SVD gives them, exactly as the authors' code
    g = torch.Generator().manual_seed(1)
    rank_two = torch.randn(30, 2, generator=g) @ torch.randn(2, 20, generator=g)
    p, s, qh = torch.linalg.svd(rank_two, full_matrices=False)
    u, s_k, vh = methods._top_svd(rank_two, 3)
    assert torch.equal(u, p[:, :3].double()) and torch.equal(vh, qh[:3].double())
    assert torch.equal(s_k, s[:3].double())
    polar, singular_values = methods._polar(rank_two)
    assert torch.equal(polar, (p @ qh).double()) and torch.equal(singular_values, s.double())
    zero = torch.zeros(4, 6)
    assert torch.equal(methods._top_svd(zero, 2)[1], torch.zeros(2, dtype=torch.float64))


def test_spectral_methods_on_degenerate_keys():
    tv = spectral_problem(1, (12, 20), seed=2, decaying=True)[0]
    same = [tv, tv]  # identical experts: CART's centred matrices are exactly zero
    torch.testing.assert_close(methods.cart(same)[MATRIX_KEY], tv[MATRIX_KEY], rtol=0, atol=0)
    # a rank-deficient sum (zero rows): Iso-C's polar factor from the authors' float32 SVD
    tvs = spectral_problem(3, (12, 20), seed=3, decaying=False)
    for t in tvs:
        t[MATRIX_KEY][8:] = 0
    stack = torch.stack([t[MATRIX_KEY] for t in tvs])
    merged = methods.iso_c(tvs)[MATRIX_KEY]
    assert relative_error(merged, _authors_matrix_merge("iso_c", stack)) < 1e-6


@pytest.mark.parametrize("kwargs", [{}, {"scope": "per_tensor"}, {"frozen_zeros": 50}])
def test_pcb_in_chunks_equals_pcb_on_whole_keys(kwargs, task_vectors, monkeypatch):
    """PCB streams (T, _PCB_CHUNK) column chunks through its statistics and its merge; the
    radix selection regroups them into blocks (stats._blocks): nothing may change."""
    monkeypatch.setattr(stats, "_SORT_BELOW", 0)  # the radix path, not a plain sort
    monkeypatch.setattr(methods, "_PCB_CHUNK", 1 << 30)
    whole_keys = methods.pcb(task_vectors, ratio=0.3, clip=0.05, **kwargs)
    monkeypatch.setattr(methods, "_PCB_CHUNK", 5)
    monkeypatch.setattr(stats, "_BLOCK", 16)
    chunked = methods.pcb(task_vectors, ratio=0.3, clip=0.05, **kwargs)
    close(chunked, whole_keys, rtol=0, atol=0)
    assert sum(int((v != 0).sum()) for v in chunked.values()) > 0


def test_order_statistics_of_many_small_chunks_are_exact(monkeypatch):
    """Small chunks are regrouped into blocks and their histogram updates pooled in a buffer
    that is counted when full: still the values a sort gives, ties included."""
    monkeypatch.setattr(stats, "_BLOCK", 1 << 12)
    values = torch.randn(2, 600_000, generator=torch.Generator().manual_seed(5))
    values[:, :1000] = 0.5
    chunks = lambda: (values[:, i : i + 777] for i in range(0, values.shape[1], 777))  # noqa: E731
    ranks = [[0, 1234, 300_000, 599_999], [5, 450_000]]
    ordered = values.sort().values
    expected = [[ordered[r, k].item() for k in row] for r, row in enumerate(ranks)]
    assert stats.order_statistics(chunks, ranks, count=600_000) == expected


def test_breadcrumbs_masks_in_place_yet_a_key_hook_gets_the_raw_task_vectors(task_vectors):
    kwargs = {"lam": 1.0, "density": 0.5, "gamma": 0.1}
    seen = {}

    def hook(key, stack, delta, index):
        seen[key] = stack.clone()
        return delta

    with methods.key_hook(hook):
        hooked = methods.breadcrumbs(task_vectors, **kwargs)
    plain = methods.breadcrumbs(task_vectors, **kwargs)
    for key in task_vectors[0]:
        stack = torch.stack([tv[key] for tv in task_vectors])
        assert torch.equal(seen[key], stack), key
        masks = torch.stack([methods._row_band_mask(tv, 0.5, 0.1) for tv in stack])
        assert torch.equal(plain[key], (stack * masks).sum(0)), key  # the authors' sum
        assert torch.equal(hooked[key], plain[key]), key
