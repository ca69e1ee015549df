"""Weight Weaving: closed forms (docs/methods.md#closed-form), pools, fast path vs pooling."""

from collections.abc import Iterator, Mapping

import pytest
import torch
from conftest import vit_like

from mergeloom import methods, vectors
from mergeloom.weave import (
    _max_abs_pool,
    _mean_pool,
    _random_pool,
    _view,
    effective_lam,
    expand_grid,
    get_pool,
    lambda_candidates,
    weave,
)

LAMBDAS = [0.1, 0.4, 0.7, 1.0]
# Methods whose pass calls the key hook: weaving them pools inside that pass.
HOOKED = [
    "weight_averaging",
    "task_arithmetic",
    "ties",
    "dare",
    "magmax",
    "random_mix",
    "consensus",
]


def close(a, b, **kw):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **kw)


def identical(a, b):
    """Bit for bit (0 and -0 differ), keys in the same order."""
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert torch.equal(a[key].view(torch.int32), b[key].view(torch.int32)), key


def pooled_views(name, task_vectors, pool, lambdas, seed, collaborative=True, hp=None):
    """Weaving as it was before pooling moved into the method's pass: D = method(lam=1), then
    one pooling pass over the raw task vectors and the views lam_i * D."""
    raw = list(task_vectors) if collaborative else []
    pool_fn = get_pool(pool, seed=seed, n_candidates=len(raw) + len(lambdas))
    return pool_fn(raw + lambda_candidates(name, task_vectors, lambdas, hp or {}))


def zero_sum_task_vectors():
    """TIES inputs where many coordinates sum to exactly 0: a, -a, and b zero on half of them."""
    a, b = vit_like(0), vit_like(1)
    for value in b.values():
        value.view(-1)[::2] = 0.0
    return [a, {k: -v for k, v in a.items()}, b]


class CountingReads(Mapping[str, torch.Tensor]):
    """A task vector that counts the keys read from it."""

    def __init__(self, tv):
        self.tv, self.reads = tv, 0

    def __getitem__(self, key):
        self.reads += 1
        return self.tv[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tv)

    def __len__(self):
        return len(self.tv)

    def shape(self, key):  # as lazy task vectors: shapes without reading
        return tuple(self.tv[key].shape)


def test_one_lambda_mean_non_collaborative_is_the_method(task_vectors):
    close(
        weave("ties", task_vectors, {"lam": [0.6]}, "mean", collaborative=False),
        methods.ties(task_vectors, lam=0.6),
    )


def test_non_collaborative_mean_is_method_at_mean_lambda(task_vectors):
    close(
        weave("ties", task_vectors, {"lam": LAMBDAS}, "mean", collaborative=False),
        methods.ties(task_vectors, lam=sum(LAMBDAS) / 4),
        rtol=1e-5,
        atol=1e-6,
    )


def test_collaborative_mean_closed_form(task_vectors):
    # (sum_t tau_t + L * mean(lambda) * D) / (T + L)
    d = methods.magmax(task_vectors, lam=1.0)
    total = methods.task_arithmetic(task_vectors, lam=1.0)
    expected = {k: (total[k] + sum(LAMBDAS) * d[k]) / 7 for k in d}
    close(weave("magmax", task_vectors, {"lam": LAMBDAS}, "mean"), expected, rtol=1e-5, atol=1e-6)


def test_max_abs_over_lambdas_keeps_the_largest(task_vectors):
    close(
        weave("iso_c", task_vectors, {"lam": LAMBDAS}, "max_abs", collaborative=False),
        methods.iso_c(task_vectors, lam=max(LAMBDAS)),
    )


def test_affine_cart_non_collaborative_mean(task_vectors):
    close(
        weave("cart", task_vectors, {"lam": LAMBDAS}, "mean", collaborative=False),
        methods.cart(task_vectors, lam=sum(LAMBDAS) / 4),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("name", sorted(methods.METHODS))
@pytest.mark.parametrize("pool", ["mean", "random", "max_abs", "ties"])
def test_fast_path_equals_explicit_pooling(name, pool, task_vectors, tmp_path):
    fast = weave(name, task_vectors, {"lam": LAMBDAS}, pool, seed=3)
    explicit = weave(
        name, task_vectors, {"lam": LAMBDAS}, pool, seed=3, closed_form=False, spill_dir=tmp_path
    )
    close(fast, explicit, rtol=1e-5, atol=1e-5)
    assert list(tmp_path.iterdir()) == []  # spilled candidates are removed


def test_random_pool_picks_from_the_pool_set_and_is_seeded(task_vectors):
    woven = weave("ties", task_vectors, {"lam": LAMBDAS}, "random", seed=1)
    d = methods.ties(task_vectors, lam=1.0)
    for key, value in woven.items():
        members = torch.stack([tv[key] for tv in task_vectors] + [lam * d[key] for lam in LAMBDAS])
        assert torch.isclose(members, value).any(dim=0).all(), key
    reordered = [dict(reversed(list(tv.items()))) for tv in task_vectors]
    close(weave("ties", reordered, {"lam": LAMBDAS}, "random", seed=1), woven, rtol=0, atol=0)
    other = weave("ties", task_vectors, {"lam": LAMBDAS}, "random", seed=2)
    assert any(not torch.equal(other[k], woven[k]) for k in woven)


def test_method_as_pool_scale():
    assert get_pool("ties", n_candidates=10).keywords["lam"] == 1.0
    assert get_pool("task_arithmetic", n_candidates=10).keywords["lam"] == pytest.approx(0.1)
    assert get_pool("dare", n_candidates=4).keywords["lam"] == pytest.approx(0.25)
    assert get_pool("dare", n_candidates=4, hyperparameters={"base": "ties"}).keywords["lam"] == 1


def test_task_arithmetic_pool_over_the_set_is_mean_pool(task_vectors):
    close(
        weave("tsv_m", task_vectors, {"lam": LAMBDAS}, "task_arithmetic"),
        weave("tsv_m", task_vectors, {"lam": LAMBDAS}, "mean"),
        rtol=1e-5,
        atol=1e-6,
    )


def test_grid_over_another_hyperparameter(task_vectors, tmp_path):
    woven = weave(
        "ties",
        task_vectors,
        {"k": [0.2, 0.5, 1.0]},
        "mean",
        collaborative=False,
        spill_dir=tmp_path,
        hyperparameters={"lam": 1.0},
    )
    expected = [methods.ties(task_vectors, lam=1.0, k=k) for k in (0.2, 0.5, 1.0)]
    close(woven, {key: sum(e[key] for e in expected) / 3 for key in woven}, rtol=1e-5, atol=1e-6)
    assert expand_grid({"k": [1, 2], "seed": [0, 1]}) == [
        {"k": 1, "seed": 0},
        {"k": 1, "seed": 1},
        {"k": 2, "seed": 0},
        {"k": 2, "seed": 1},
    ]


def test_weave_streams_lazy_task_vectors_from_files(task_vectors, tmp_path):
    base = vit_like(9)
    vectors.save(base, tmp_path / "base.safetensors")
    paths = [tmp_path / f"e{i}.safetensors" for i in range(3)]
    for path, tv in zip(paths, task_vectors, strict=True):
        vectors.save(vectors.apply(base, tv), path)
    lazy = vectors.load_task_vectors(tmp_path / "base.safetensors", paths)
    close(
        weave("pcb", lazy, {"lam": LAMBDAS}, "random"),
        weave("pcb", task_vectors, {"lam": LAMBDAS}, "random"),
        rtol=1e-4,
        atol=1e-5,
    )


def test_method_seed_and_pool_seed_are_separate(task_vectors):
    a = weave("dare", task_vectors, {"lam": LAMBDAS}, "random", seed=1, hyperparameters={"seed": 5})
    b = weave("dare", task_vectors, {"lam": LAMBDAS}, "random", seed=1, hyperparameters={"seed": 6})
    c = weave("dare", task_vectors, {"lam": LAMBDAS}, "random", seed=2, hyperparameters={"seed": 5})
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the DARE mask seed matters
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and so does the pool's


def test_effective_lambda():
    grid = [round(0.05 * i, 2) for i in range(1, 21)]
    assert effective_lam(8, grid, collaborative=True) == pytest.approx(0.375)
    assert effective_lam(8, grid, collaborative=False) == pytest.approx(0.525)


def test_bad_weave_input(task_vectors):
    with pytest.raises(ValueError, match="unknown pool 'median'; known: max_abs, mean, random"):
        weave("ties", task_vectors, {"lam": LAMBDAS}, "median")
    with pytest.raises(ValueError, match="search space is empty"):
        weave("ties", task_vectors, {}, "mean")
    with pytest.raises(ValueError, match=r"no values for \['lam'\]"):
        weave("ties", task_vectors, {"lam": []}, "mean")
    with pytest.raises(ValueError, match=r"\['lam'\] given both"):
        weave("ties", task_vectors, {"lam": LAMBDAS}, "mean", hyperparameters={"lam": 1.0})
    with pytest.raises(ValueError, match="unknown merge method 'tie'"):
        weave("tie", task_vectors, {"lam": LAMBDAS}, "mean")
    with pytest.raises(TypeError, match="densty"):
        weave("ties", task_vectors, {"densty": [0.1]}, "mean")
    with pytest.raises(ValueError, match="seed must be an integer"):
        weave("ties", task_vectors, {"lam": LAMBDAS}, "random", seed=0.5)


# ---------------------------------------------------------------- pooling inside the method's pass

CASES = [(name, {}) for name in sorted(methods.METHODS)] + [
    ("dare", {"base": "ties"}),
    ("ties", {"merge": "max", "scope": "per_tensor"}),
]


@pytest.mark.parametrize(("name", "hp"), CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("pool", ["random", "max_abs"])
@pytest.mark.parametrize("collaborative", [True, False])
def test_pooling_in_the_pass_is_exact(name, hp, pool, collaborative, task_vectors):
    woven = weave(name, task_vectors, {"lam": LAMBDAS}, pool, seed=3,
                  collaborative=collaborative, hyperparameters=hp)  # fmt: skip
    identical(woven, pooled_views(name, task_vectors, pool, LAMBDAS, 3, collaborative, hp))


@pytest.mark.parametrize(("name", "hp"), CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("collaborative", [True, False])
def test_mean_pool_in_the_pass_is_the_mean_up_to_rounding(name, hp, collaborative, task_vectors):
    """The mean is taken in closed form, (sum tau + sum(lam) D) / (T + L): same value, another
    summation order, so equal to float32 rounding (a few ulps)."""
    woven = weave(name, task_vectors, {"lam": LAMBDAS}, "mean",
                  collaborative=collaborative, hyperparameters=hp)  # fmt: skip
    explicit = weave(name, task_vectors, {"lam": LAMBDAS}, "mean", collaborative=collaborative,
                     hyperparameters=hp, closed_form=False)  # fmt: skip
    close(woven, pooled_views(name, task_vectors, "mean", LAMBDAS, 0, collaborative, hp),
          rtol=1e-6, atol=1e-6)  # fmt: skip
    close(woven, explicit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["mean", "random", "max_abs"])
@pytest.mark.parametrize("hp", [{}, {"merge": "sum"}])
def test_ties_zero_sign_coordinates_are_pooled_with_the_majority_sign(pool, hp):
    task_vectors = zero_sum_task_vectors()
    delta = methods.ties(task_vectors, lam=1.0, k=1.0, **hp)
    trimmed_sum = sum(tv["proj"] for tv in task_vectors)
    assert (trimmed_sum == 0).sum() > 5 and delta["proj"][trimmed_sum == 0].abs().sum() > 0
    hp = {"k": 1.0, **hp}
    woven = weave("ties", task_vectors, {"lam": LAMBDAS}, pool, seed=5, hyperparameters=hp)
    expected = pooled_views("ties", task_vectors, pool, LAMBDAS, 5, hp=hp)
    if pool == "mean":
        close(woven, expected, rtol=1e-6, atol=1e-6)
    else:
        identical(woven, expected)


@pytest.mark.parametrize(
    "lambdas",
    [[1.0, 0.7, 0.4, 0.1], [0.7, 0.1, 1.0, 0.4], [0.4, 0.4, 1.0, 1.0], [-1.0, -0.5, 0.5, 1.0],
     [0.5, -1.0, 1.0], [0.3]],
)  # fmt: skip
@pytest.mark.parametrize("pool", ["random", "max_abs"])
def test_pooling_in_the_pass_over_any_lambda_order(lambdas, pool, task_vectors):
    for name in ("ties", "magmax"):
        woven = weave(name, task_vectors, {"lam": lambdas}, pool, seed=1)
        identical(woven, pooled_views(name, task_vectors, pool, lambdas, 1))


def integer_ties(seed, shape=(6, 50)):
    """Small integers with many exact ties in magnitude, and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-3, 4, shape, generator=g).float()
    values[torch.rand(shape, generator=g) < 0.2] = -0.0
    return values


def reference_max_abs(rows):
    best = rows[0].clone()
    for row in rows[1:]:
        take = row.abs() >= best.abs()
        best = torch.where(take, row, best)
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize(
    "lambdas", [[0.0, 0.5, 1.0], [1.0, 0.5, 0.0], [0.5, 0.0, 1.0, 0.5], [-1.0, 1.0], [2.0]]
)
def test_closed_pools_equal_pooling_the_candidates(seed, affine, lambdas):
    """Pools over raw rows and views offset + lam * D, with ties and signed zeros: max_abs and
    random exactly, mean up to rounding."""
    raw, direction = integer_ties(seed), integer_ties(seed + 10)[0] / 2
    offset = integer_ties(seed + 20)[0] if affine else None
    for r in (raw, None):
        candidates = [
            *(r if r is not None else []),
            *(_view(offset, direction, x) for x in lambdas),
        ]
        stack = torch.stack(candidates)
        got = _max_abs_pool(r, offset, direction, lambdas)
        assert torch.equal(got.view(torch.int32), reference_max_abs(stack).view(torch.int32))
        choice = torch.randint(len(stack), direction.shape, generator=torch.Generator())
        got = _random_pool(r, offset, direction, lambdas, choice)
        expected = stack.gather(0, choice[None])[0]
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
        torch.testing.assert_close(_mean_pool(r, offset, direction, lambdas), stack.mean(0))


def test_select_is_torch_where_bit_for_bit():
    a, b = integer_ties(0), integer_ties(1)
    a.view(-1)[::9], b.view(-1)[::13] = float("nan"), -float("inf")
    mask = integer_ties(2) > 0
    assert torch.equal(methods.select(mask, a, b).view(torch.int32),
                       torch.where(mask, a, b).view(torch.int32))  # fmt: skip


def test_random_choice_draws_are_the_int64_draws():
    """random_mix and the random pool draw int32 indices: the values torch draws as int64."""
    for n, shape in [(3, (7, 5)), (28, (1000,)), (70_000, (300,)), (5, ())]:
        expected = torch.randint(n, shape, generator=methods._generator(4, "k"))
        assert torch.equal(methods.random_choice(n, shape, 4, "k").long(), expected)


@pytest.mark.parametrize("seed", range(6))
def test_largest_magnitude_is_the_running_rule(seed):
    """The later row wins ties, 0 vs -0 included; NaN and inf behave as the running comparison."""
    rows = integer_ties(seed, (1 + seed, 40))
    if seed % 2:
        rows.view(-1)[:: 7 + seed] = float("nan")
        rows.view(-1)[:: 11 + seed] = -float("inf")
    expected = reference_max_abs(rows)
    for split in range(1, len(rows) + 1):  # the first rows as a stack, the others one by one
        got = methods.largest_magnitude(rows[:split], *rows[split:])
        assert torch.equal(got.isnan(), expected.isnan())
        keep = ~got.isnan()
        assert torch.equal(got[keep].view(torch.int32), expected[keep].view(torch.int32))


@pytest.mark.parametrize("name", HOOKED)
@pytest.mark.parametrize("pool", ["mean", "random", "max_abs"])
def test_weaving_reads_the_experts_as_often_as_one_merge(name, pool, task_vectors):
    """Pooling happens in the method's pass: no second pass over the experts (DARE reads the
    raw task vectors once more beside its dropped views)."""
    merging = [CountingReads(tv) for tv in task_vectors]
    methods.get(name)(merging)
    weaving = [CountingReads(tv) for tv in task_vectors]
    weave(name, weaving, {"lam": LAMBDAS}, pool)
    extra = len(task_vectors[0]) if name == "dare" else 0
    assert [c.reads for c in weaving] == [c.reads + extra for c in merging]


def test_a_method_without_key_hook_is_pooled_in_a_second_pass(task_vectors, monkeypatch):
    """A method that never calls its key hook still weaves: its update is pooled afterwards."""

    def plain_task_arithmetic(task_vectors, *, lam=0.3):
        return {k: sum(tv[k] for tv in task_vectors) * lam for k in task_vectors[0]}

    monkeypatch.setitem(methods.METHODS, "task_arithmetic", plain_task_arithmetic)
    for pool in ("mean", "random", "max_abs"):
        woven = weave("task_arithmetic", task_vectors, {"lam": LAMBDAS}, pool, seed=2)
        explicit = pooled_views("task_arithmetic", task_vectors, pool, LAMBDAS, 2)
        identical(woven, explicit)
