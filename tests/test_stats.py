import pytest
import torch

from mergeloom import stats


@pytest.fixture(params=["sort", "radix"], autouse=True)
def selection_path(request, monkeypatch):
    """Run every test through both the small-input sort and the streaming radix selection."""
    if request.param == "radix":
        monkeypatch.setattr(stats, "_SORT_BELOW", 0)
    return request.param


def chunked(x, sizes):
    parts = list(torch.split(x, sizes, dim=-1))
    return lambda: iter(parts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_order_statistics_match_sorting(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1000, generator=g) * 10
    x[:, :50] = 0.0  # many ties, and zeros of both signs
    x[0, 50:60] = -0.0
    x[1, 60:200] = 2.5
    ranks = [[0, 1, 499, 999], [0, 100, 150, 999], [500, 500, 3]]
    got = stats.order_statistics(chunked(x, [1, 333, 666]), ranks)
    ordered = x.sort(dim=1).values
    for r, row in enumerate(ranks):
        assert got[r] == [ordered[r, k].item() for k in row]


def test_order_statistics_extreme_values():
    x = torch.tensor([float("-3.4e38"), -1e-45, 0.0, 1e-45, 3.4e38, 1.0])
    got = stats.order_statistics(lambda: [x], [list(range(6))])[0]
    assert got == x.sort().values.tolist()


def test_rank_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"rank\(s\) \[5\] out of range for a vector of 5"):
        stats.order_statistics(lambda: [torch.zeros(5)], [[5]])


def test_quantiles_match_torch_quantile():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 777, generator=g)
    qs = [0.0, 0.01, 0.5, 0.95, 0.99, 1.0]
    got = stats.quantiles(chunked(x, [100, 677]), qs, rows=4)
    torch.testing.assert_close(got, torch.quantile(x, torch.tensor(qs), dim=1).T)
    with pytest.raises(ValueError, match=r"quantile levels must lie in \[0, 1\], got \[1.5\]"):
        stats.quantiles(chunked(x, [777]), [1.5], rows=4)


def test_quantiles_of_a_vector_above_2_pow_24(selection_path):
    if selection_path == "sort":
        pytest.skip("large inputs always take the radix path")
    # the size older torch.quantile refused, and the scale of a ViT-B task vector (8.8e7)
    x = torch.rand(2**24 + 10, generator=torch.Generator().manual_seed(0))
    got = stats.quantiles(chunked(x, [2**23, 2**23 + 10]), [0.01, 0.5])
    torch.testing.assert_close(got[0], torch.quantile(x, torch.tensor([0.01, 0.5])))


def test_topk_threshold_follows_ties_reference():
    x = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0, 0.1, 7.0, -0.2, 1.5, 0.0])
    for fraction in (0.1, 0.2, 0.5, 0.9):
        d = x.numel()
        kth = d - int(d * fraction)
        expected = x.abs().kthvalue(kth).values.item()
        assert stats.topk_threshold(chunked(x, [4, 6]), fraction) == expected
    assert stats.topk_threshold(chunked(x, [10]), 1.0) == 0.0
