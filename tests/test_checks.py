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


# ------------------------------------------------------------------ the EGNN op's shared input checks
def _egnn_problem(B=2, N=5, He=4, M=3, Hx=6, E=2):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    args = [r(B, N, 3), r(B, N, He), r(B, N, He), r(He), r(He, M), r(M), r(M, Hx), r(Hx), r(Hx)]
    return args, dict(E=E, r=r, B=B, N=N, He=He, M=M)


def _nan(t):
    t = t.clone()
    t.view(-1)[-1] = float("nan")
    return t


# (id, build kwargs from (args, info) -> (args, kwargs), exception, message)
_EGNN_BAD = [
    ("q_width", lambda a, i: (a[:2] + [i["r"](i["B"], i["N"], i["He"] + 1)] + a[3:], {}), ValueError,
     r"q: expected shape \(2, 5, 4\)"),
    ("w_d_length", lambda a, i: (a[:3] + [i["r"](i["He"] + 1)] + a[4:], {}), ValueError, r"w_d: expected shape \(4\), got \(5,\)"),
    ("W2_dtype", lambda a, i: (a[:4] + [a[4].float()] + a[5:], {}), TypeError, "W2: expected dtype torch.float64"),
    ("w_att_dtype", lambda a, i: (a, dict(w_att=i["r"](i["M"]).float(), b_att=i["r"](()))), TypeError,
     "w_att: expected dtype torch.float64"),
    ("b_att_two_values", lambda a, i: (a, dict(w_att=i["r"](i["M"]), b_att=i["r"](2))), ValueError,
     "b_att: expected a scalar tensor"),
    ("w_att_alone", lambda a, i: (a, dict(w_att=i["r"](i["M"]))), ValueError, "w_att and b_att come together"),
    ("edge_attr_alone", lambda a, i: (a, dict(edge_attr=i["r"](i["B"], i["N"], i["N"], i["E"]))), ValueError,
     "edge_attr and W_e come together"),
    ("both_edge_terms", lambda a, i: (a, dict(edge_attr=i["r"](i["B"], i["N"], i["N"], i["E"]),
                                              W_e=i["r"](i["E"], i["He"]), rel=i["r"](5, i["He"]))), ValueError,
     "at most one edge term"),
    ("W_e_rows", lambda a, i: (a, dict(edge_attr=i["r"](i["B"], i["N"], i["N"], i["E"]),
                                       W_e=i["r"](i["E"] + 1, i["He"]))), ValueError, r"W_e: expected shape \(2, 4\)"),
    ("rel_even_rows", lambda a, i: (a, dict(rel=i["r"](4, i["He"]))), ValueError, r"rel: expected 2K \+ 1 rows"),
    ("eps_zero", lambda a, i: (a, dict(eps=0.0)), ValueError, "eps: must be > 0"),
    ("coords_agg", lambda a, i: (a, dict(coords_agg="max")), ValueError, "coords_agg: expected one of"),
    ("normalize_typo", lambda a, i: (a, dict(normalize="clip")), ValueError, "normalize: expected one of"),
    ("nan_W_e", lambda a, i: (a, dict(edge_attr=i["r"](i["B"], i["N"], i["N"], i["E"]),
                                      W_e=_nan(i["r"](i["E"], i["He"])))), ValueError, "W_e: contains NaN"),
    ("nan_rel", lambda a, i: (a, dict(rel=_nan(i["r"](5, i["He"])))), ValueError, "rel: contains NaN"),
    ("nan_w_att", lambda a, i: (a, dict(w_att=_nan(i["r"](i["M"])), b_att=i["r"](()))), ValueError,
     "w_att: contains NaN"),
    ("nan_W3", lambda a, i: (a[:6] + [_nan(a[6])] + a[7:], {}), ValueError, "W3: contains NaN"),
    ("empty_sample", lambda a, i: (a, dict(mask=torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool))),
     ValueError, r"mask: sample\(s\) \[1\] have no real nodes"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", _EGNN_BAD, ids=[c[0] for c in _EGNN_BAD])
def test_egnn_checks_refuse_each_bad_argument_by_name(case, backend):
    """Every shared check of check_egnn_pair_aggregate_inputs fires, with its own error, on every CPU
    backend (the cpu kernels would otherwise silently cast a mixed dtype, read K from an even table,
    run a NaN weight, or treat a typo'd normalize as "clamp")."""
    from protdiff_fast import backends
    from protdiff_fast.ops import egnn_pair_aggregate

    if backend == "cpu" and backends.cpu_extension() is None:
        pytest.skip("C++ extension not built")
    _, build, exc, msg = case
    args, info = _egnn_problem()
    args, kw = build(list(args), info)
    with pytest.raises(exc, match=msg):
        egnn_pair_aggregate(*args, backend=backend, **kw)
