"""Errors of the nn modules name what the caller passed (found by an audit of protdiff_fast.nn):
the fused op's own argument names (p, x, W2, edge_attr) mean nothing to a caller of EGNNLayer's
``rel_offsets`` or of the egnn-pytorch drop-in's ``feats`` / ``coors`` / ``edges``."""
import math

import pytest
import torch

from protdiff_fast.nn import EGNN, EGNNLayer, compat


def test_egnn_layer_names_rel_offsets_when_it_was_given_as_rel_offsets():
    """A bad offset table passed as ``rel_offsets=`` was reported as ``edge_attr`` (the 2-D edge_attr path
    it shares); given as a 2-D edge_attr it is still named edge_attr."""
    layer = EGNNLayer(8, 3, backend="reference")
    h, x = torch.randn(2, 5, 8), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"^rel_offsets: expected shape \(\*, 3\), got \(5, 2\)"):
        layer(h, x, rel_offsets=torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"^rel_offsets: an offset table needs 2K \+ 1 rows, got 4"):
        layer(h, x, rel_offsets=torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"^rel_offsets: expected dtype torch.float32 .* got torch.float64"):
        layer(h, x, rel_offsets=torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^rel_offsets: an offset table needs 2K \+ 1 rows"):  # through the stack
        EGNN(4, 8, num_layers=1, edge_dim=3, backend="reference")(torch.randn(2, 5, 4), x, rel_offsets=torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"^edge_attr: an offset table needs 2K \+ 1 rows, got 4"):
        layer(h, x, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"^edge_attr: expected shape \(\*, 3\), got \(5, 2\)"):
        layer(h, x, torch.randn(5, 2))


def _poke(t, value=math.nan):
    t = t.clone()
    t.view(-1)[3] = value
    return t


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compat_errors_name_its_own_inputs_and_parameters(backend):
    """NaN / Inf in the drop-in's inputs or parameters: the error names feats, coors, edges or the
    parameter (as egnn-pytorch's state_dict calls it), not the fused op's p, x, edge_attr or W2."""
    layer = compat.EGNN(dim=4, edge_dim=2, soft_edges=True, backend=backend)
    g = torch.Generator().manual_seed(0)
    feats, coors, edges = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 3, generator=g), \
        torch.randn(2, 5, 5, 2, generator=g)
    with pytest.raises(ValueError, match=r"^feats \(or edge_mlp.0's weight or bias\), .*: contains NaN values"):
        layer(_poke(feats), coors, edges)
    with pytest.raises(ValueError, match=r"^feats .*: contains Inf values"):
        layer(_poke(feats, math.inf), coors, edges)
    with pytest.raises(ValueError, match=r"^coors: contains NaN values"):
        layer(feats, _poke(coors), edges)
    with pytest.raises(ValueError, match=r"^edges: contains Inf values"):
        layer(feats, coors, _poke(edges, -math.inf))
    for name in ("edge_mlp.3.weight", "coors_mlp.0.weight", "edge_gate.0.weight"):
        broken = compat.EGNN(dim=4, edge_dim=2, soft_edges=True, backend=backend)
        with torch.no_grad():
            dict(broken.named_parameters())[name].view(-1)[0] = math.nan
        with pytest.raises(ValueError, match=rf"^{name.replace('.', '[.]')}: contains NaN values"):
            broken(feats, coors, edges)
    # other errors pass through as they were
    with pytest.raises(ValueError, match=r"^mask: sample\(s\) \[1\] have no real nodes"):
        layer(feats, coors, edges, mask=torch.tensor([[True] * 5, [False] * 5]))


@pytest.mark.parametrize("normalize", [1, 0, "yes", None])
def test_egnn_layer_refuses_a_bad_normalize_when_built(normalize):
    """normalize is False, True or "clamp": 1 ran on the triton backend (read as True) and was refused by the
    reference and cpu backends at the first call; now every backend refuses it when the layer is built."""
    with pytest.raises(ValueError, match=r"normalize: expected one of \(False, True, 'clamp'\)"):
        EGNNLayer(16, normalize=normalize, backend="triton")
    for ok in (False, True, "clamp"):
        assert EGNNLayer(16, normalize=ok).normalize == ok


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_egnn_stack_needs_at_least_one_layer(bad):
    with pytest.raises(ValueError, match=rf"num_layers must be an integer >= 1, got {bad!r}"):
        EGNN(4, 8, num_layers=bad)
    assert len(EGNN(4, 8, num_layers=1).layers) == 1


def test_egnn_stack_layer_norm_and_output_mask():
    """EGNN(layer_norm=True): each layer's h goes through LayerNorm, so with an identity embedding_out the
    real rows of the output have mean 0 and variance 1 over the features (LayerNorm's own definition,
    written out), and the padding rows of h come out zero even through embedding_out's bias."""
    torch.manual_seed(0)
    stack = EGNN(4, 8, out_dim=8, num_layers=2, layer_norm=True, backend="reference").double()
    with torch.no_grad():
        stack.embedding_out.weight.copy_(torch.eye(8))
        stack.embedding_out.bias.zero_()
    g = torch.Generator().manual_seed(2)
    h, x = 3 * torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    out = stack(h, x, mask=mask)[0].detach()
    real = out[mask]
    torch.testing.assert_close(real.mean(-1), torch.zeros(len(real), dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(real.var(-1, correction=0), torch.ones(len(real), dtype=torch.float64), rtol=0,
                               atol=1e-3)  # LayerNorm's eps 1e-5 in the denominator
    with torch.no_grad():
        stack.embedding_out.bias.fill_(0.5)
    out = stack(h, x, mask=mask)[0].detach()
    assert float(out[~mask].abs().max()) == 0.0 and float(out[mask].abs().min()) > 0
