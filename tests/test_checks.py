"""The shared input checks: NaN/Inf always caught, huge finite values never refused."""
import pytest
import torch

from protdiff_fast._checks import check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_catches_every_non_finite_entry(dtype, bad):
    for position in (0, 17, 99):
        t = torch.randn(100, dtype=torch.float64).to(dtype)
        t[position] = bad
        with pytest.raises(ValueError, match="x: contains (NaN|Inf) values"):
            check_finite("x", t)


def test_check_finite_accepts_finite_values_whose_sum_overflows():
    check_finite("x", torch.full((10,), 3e38))  # the float32 sum is inf; every entry is finite
    check_finite("x", torch.full((4,), 6e4, dtype=torch.float16))
    check_finite("x", torch.empty(0))
    t = torch.full((10,), 3e38)
    t[3] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        check_finite("x", t)
    t = torch.tensor([float("inf"), float("-inf")])  # the sum is NaN: still reported as Inf
    with pytest.raises(ValueError, match="Inf"):
        check_finite("x", t)
