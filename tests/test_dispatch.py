"""backend="auto" for egnn_pair_aggregate: a fast path that cannot run a call (a width the Triton
kernels lack, an option a backend does not implement) falls back to the reference with a warning,
never an error; an explicit backend still raises."""
import pytest
import torch

import protdiff_fast.ops as ops
from protdiff_fast.backends import get_impl
from protdiff_fast.ops import egnn_pair_aggregate
from test_egnn_cpu import FLAG_SETS, make_problem


def _auto_picks_triton(monkeypatch):
    def fake(op, backend, device):
        return get_impl(op, "triton" if backend == "auto" else backend, device)
    monkeypatch.setattr(ops, "get_impl", fake)
    ops._warn_fallback.cache_clear()


def test_auto_falls_back_to_reference_for_a_width_triton_lacks(monkeypatch):
    _auto_picks_triton(monkeypatch)
    args, kw = make_problem(1, 6, 300, 2, "offset", FLAG_SETS[1], seed=2)  # H = 300 > 256
    args = [a.float() for a in args]
    kw = {k: (v.float() if torch.is_tensor(v) and v.dtype.is_floating_point else v) for k, v in kw.items()}
    with pytest.warns(RuntimeWarning, match="cannot run this call.*up to 256.*reference instead"):
        got = egnn_pair_aggregate(*args, backend="auto", **kw)
    want = egnn_pair_aggregate(*args, backend="reference", **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="up to 256"):
        egnn_pair_aggregate(*args, backend="triton", **kw)


def test_auto_uses_triton_when_it_can(monkeypatch):
    _auto_picks_triton(monkeypatch)
    args, kw = make_problem(1, 6, 20, 2, "none", {}, seed=2)  # padded to 32 by the dispatcher
    args = [a.float() for a in args]
    kw = {k: (v.float() if torch.is_tensor(v) and v.dtype.is_floating_point else v) for k, v in kw.items()}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = egnn_pair_aggregate(*args, backend="auto", **kw)
    want = egnn_pair_aggregate(*args, backend="reference", **kw)
    assert all(float((a - b).abs().max()) < 1e-5 for a, b in zip(got, want))
