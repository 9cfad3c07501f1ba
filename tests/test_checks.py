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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_all_finite_names_the_first_bad_tensor_with_one_read_when_all_are_finite(bad, monkeypatch):
    from protdiff_fast import _checks
    from protdiff_fast._checks import check_all_finite, skip_value_checks

    tensors = [("x", torch.randn(3, 5)), ("p", torch.randn(2, 4, dtype=torch.bfloat16)), ("q", None),
               ("e", torch.full((10,), 3e38)), ("empty", torch.empty(0))]
    check_all_finite(tensors)  # huge finite values (a float32 sum of inf), a None, an empty tensor: accepted
    calls = []
    monkeypatch.setattr(_checks, "check_finite", lambda name, t: calls.append(name))
    check_all_finite([(n, t) for n, t in tensors if n != "e"])
    assert calls == []  # one combined read, no per-tensor checks on the finite path
    monkeypatch.undo()
    for position, name in ((0, "x"), (1, "p")):
        named = [(n, None if t is None else t.clone()) for n, t in tensors]
        named[position][1].view(-1)[2] = bad
        with pytest.raises(ValueError, match=f"^{name}: contains (NaN|Inf) values"):
            check_all_finite(named)
        with skip_value_checks():
            check_all_finite(named)  # value checks off: nothing read, nothing raised


def test_check_all_finite_joins_the_masks_empty_sample_check_to_its_read(monkeypatch):
    from protdiff_fast import _checks
    from protdiff_fast._checks import check_all_finite, check_mask

    mask = check_mask(torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]]), 3, 3, torch.device("cpu"), check_empty=False)
    assert mask.dtype == torch.bool  # not refused yet: the empty sample is found by the combined read
    x = torch.randn(3, 3, 3)
    with pytest.raises(ValueError, match=r"mask: sample\(s\) \[1\] have no real nodes"):
        check_all_finite([("x", x)], mask=mask)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"mask: sample\(s\) \[1\]"):  # the mask first, as check_mask would
        check_all_finite([("x", x)], mask=mask)
    mask[1, 0] = True
    with pytest.raises(ValueError, match="x: contains NaN"):
        check_all_finite([("x", x)], mask=mask)
    calls = []
    monkeypatch.setattr(_checks, "check_mask", lambda *a: calls.append(a))
    monkeypatch.setattr(_checks, "check_finite", lambda *a: calls.append(a))
    check_all_finite([("x", torch.randn(3, 3, 3))], mask=mask)
    check_all_finite([], mask=mask)
    assert calls == []
    with pytest.raises(ValueError, match="no nodes"):  # N = 0 is still refused by check_mask itself
        check_mask(torch.zeros(2, 0, dtype=torch.bool), 2, 0, torch.device("cpu"), check_empty=False)
