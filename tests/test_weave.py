"""Weight Weaving: closed forms (docs/methods.md#closed-form), pools, fast path vs pooling."""

import pytest
import torch
from conftest import vit_like

from mergeloom import methods, vectors
from mergeloom.weave import effective_lam, expand_grid, get_pool, weave

LAMBDAS = [0.1, 0.4, 0.7, 1.0]


def close(a, b, **kw):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **kw)


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
