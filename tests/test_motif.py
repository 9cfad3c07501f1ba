"""Motif scaffolding: contigs and motif specs, Kabsch RMSD, resampling, replacement invariants, bad input."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import random_orthogonal
from protdiff_fast.diffusion import DDPMScheduler
from protdiff_fast.io.structure import StructureError
from protdiff_fast.metrics.motif import motif_rmsd, success_rate
from protdiff_fast.motif import (
    ContigError,
    MotifSegment,
    ScaffoldingError,
    ScaffoldSegment,
    effective_sample_size,
    motif_spec,
    motif_trajectory,
    parse_contig,
    parse_length_range,
    replace_motif,
    residual_resample,
    scaffold,
    systematic_resample,
)
from protdiff_fast.reference.com import remove_center_of_mass_reference

DATA = Path(__file__).parent / "data"
MOTIF_5TPN = DATA / "motif_5tpn.pdb"  # A163-181
MOTIF_1PRW = DATA / "motif_1prw.pdb"  # A16-35, A52-71


# ------------------------------------------------------------------------------------------ contigs

def test_parse_contig_segments_in_order():
    segs = parse_contig("10-20,A15-30,5, B7,0-3")
    assert segs == [ScaffoldSegment(10, 20), MotifSegment("A", 15, 30), ScaffoldSegment(5, 5),
                    MotifSegment("B", 7, 7), ScaffoldSegment(0, 3)]
    assert parse_contig("A-3-4")[0] == MotifSegment("A", -3, 4)  # negative author numbers


@pytest.mark.parametrize("contig, words", [
    ("", "empty"), ("10-20", "no motif"), ("10-20,,A1-5", "empty segment"), ("20-10,A1-5", "min 20 > max 10"),
    ("A9-5", "backwards"), ("10-20,A1-10,5,A8-12", "overlap"), ("10-20,A1-5,x?", "cannot read"),
    # a blank inside a segment was removed: "5 10" became a 510-residue scaffold, "A15-30 5-15" chain 'A15'
    ("5 10,A1-5", "segment '5 10' contains a space"), ("A15-30 5-15", "segment 'A15-30 5-15' contains a space"),
])
def test_parse_contig_errors(contig, words):
    with pytest.raises(ContigError, match=words):
        parse_contig(contig)


def test_parse_length_range():
    assert parse_length_range("60-80") == (60, 80)
    assert parse_length_range("70") == (70, 70) and parse_length_range(70) == (70, 70)
    assert parse_length_range(None) is None
    for bad in ("80-60", "0-5", "abc"):
        with pytest.raises(ContigError):
            parse_length_range(bad)


def test_motif_spec_reads_residues_and_centres_and_scales():
    spec = motif_spec(MOTIF_1PRW, "5-20,A16-35,10-25,A52-71,5-20", "60-105")
    assert spec.num_motif == 40 and (spec.min_length, spec.max_length) == (60, 105)
    import gemmi

    st = gemmi.read_structure(str(MOTIF_1PRW))
    want = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in st[0]["A"] for a in r if a.name == "CA"
                     and (16 <= r.seqid.num <= 35 or 52 <= r.seqid.num <= 71)])
    np.testing.assert_array_equal(spec.motif_ca, want)
    units = spec.motif_model_units()
    np.testing.assert_allclose(units.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(units * 10, want - want.mean(0), atol=1e-12)


def test_motif_spec_reads_mmcif(tmp_path):
    import gemmi

    st = gemmi.read_structure(str(MOTIF_5TPN))
    st.setup_entities()
    cif = tmp_path / "motif.cif"
    st.make_mmcif_document().write_file(str(cif))
    a = motif_spec(MOTIF_5TPN, "10-40,A163-181,10-40", "50-75")
    b = motif_spec(cif, "10-40,A163-181,10-40", "50-75")
    np.testing.assert_allclose(a.motif_ca, b.motif_ca, atol=1e-3)


@pytest.mark.parametrize("contig, length, words", [
    ("10-40,B163-181,10-40", None, "no chain 'B'"),
    ("10-40,A160-181,10-40", None, r"no CA for residue\(s\) 160, 161, 162"),
    ("10-20,A163-1000000000000000000000,10-20", None, r"no CA for residue\(s\) 1000000000000000000000, "),
    ("10-40,A163-181,10-40", "10-15", "19 residues, more than the maximum length 15"),
    ("10-20,A163-181,10-20", "70-80", "cannot meet the requested length 70-80"),
    ("0,A163-181,0", "25-30", "cannot meet"),
])
def test_motif_spec_errors(contig, length, words):
    with pytest.raises((ContigError, StructureError), match=words):
        motif_spec(MOTIF_5TPN, contig, length)


def test_a_motif_residue_outside_the_ca_trace_says_why(tmp_path):
    """An unknown residue code with a CA (dropped from the trace: not an amino acid) or an amino acid
    without CA: the error names which, not only that the CA is missing."""
    from test_io import chain_of, write_pdb

    res = chain_of(20)
    res[6] = ("ZZZ",) + res[6][1:]
    res[8] = (res[8][0], res[8][1], " ", [("N", (0.0, 0.0, 0.0), " ", 1.0)])
    path = write_pdb(tmp_path / "odd.pdb", res)
    with pytest.raises(ContigError, match=r"residue\(s\) 7 of .*residue 7 is ZZZ, not an amino acid"):
        motif_spec(path, "10-20,A4-7,10-20")
    with pytest.raises(ContigError, match=r"residue\(s\) 9 of .*residue 9 \(ALA\) has no CA atom"):
        motif_spec(path, "10-20,A9-12,10-20")
    with pytest.raises(ContigError, match="the file has no residue 30 in chain A"):
        motif_spec(path, "10-20,A30-31,10-20")


def test_a_hetatm_ligand_motif_residue_is_named_as_such_not_as_lacking_a_ca(tmp_path):
    """A free amino acid after TER (HETATM, a bound ligand) has a CA but is left out of the trace: the error
    said "has no CA atom", which sent users looking for a missing atom."""
    from test_io import atom_line

    protein = [atom_line(i + 1, "CA", "ALA", "A", i + 1, (3.8 * i, 0, 0)) for i in range(6)]
    ligand = atom_line(20, "CA", "GLU", "A", 101, (30.0, 5.0, 0.0), record="HETATM")
    path = tmp_path / "ligand.pdb"
    path.write_text("\n".join(protein + ["TER", ligand, "END", ""]))
    with pytest.raises(ContigError, match=r"residue 101 \(GLU\) is a HETATM non-polymer residue") as err:
        motif_spec(path, "5,A101,5")
    assert "no CA atom" not in str(err.value)


def test_motif_spec_respects_model_max_length():
    spec = motif_spec(MOTIF_5TPN, "0-200,A163-181,0-200", None, max_model_length=128)
    assert spec.max_length == 128
    with pytest.raises(ContigError, match="model"):
        motif_spec(MOTIF_5TPN, "150-200,A163-181,0", None, max_model_length=128)
    # without a model, the models' own limit: an end of 10^20 failed inside numpy's draw ("high is out of
    # bounds for int64")
    from protdiff_fast.models.protdiff import MAX_LENGTH

    spec = motif_spec(MOTIF_5TPN, "10-99999999999999999999,A163-181,0", None)
    assert spec.max_length == MAX_LENGTH
    assert 29 <= spec.sample_layout(0).length <= MAX_LENGTH


def test_layouts_valid_reproducible_and_varied():
    spec = motif_spec(MOTIF_1PRW, "5-20,A16-35,10-25,A52-71,5-20", "60-105")
    seen = set()
    for seed in range(200):
        lay = spec.sample_layout(seed)
        assert 60 <= lay.length <= 105
        a, b, c = lay.scaffold_lengths
        assert 5 <= a <= 20 and 10 <= b <= 25 and 5 <= c <= 20
        np.testing.assert_array_equal(lay.motif_positions,
                                      np.r_[a:a + 20, a + 20 + b:a + 40 + b])
        assert lay.contig(spec.segments) == f"{a},A16-35,{b},A52-71,{c}"
        assert lay.motif_mask.sum() == 40
        again = spec.sample_layout(seed)  # the same seed gives the same layout
        assert again.scaffold_lengths == lay.scaffold_lengths
        np.testing.assert_array_equal(again.motif_positions, lay.motif_positions)
        seen.add(lay.length)
    assert len(seen) > 20  # lengths spread over the range, not stuck at one value
    # a tight total length forces the scaffold lengths, and every draw still meets it
    tight = motif_spec(MOTIF_1PRW, "5-20,A16-35,10-25,A52-71,5-20", "105")
    assert all(tight.sample_layout(s).scaffold_lengths == (20, 25, 20) for s in range(5))


# ------------------------------------------------------------------------------------------ Kabsch

def _kabsch_numpy(P, Q):
    """Float64 reference, one pair at a time (textbook Kabsch with the reflection fix)."""
    P = P - P.mean(0)
    Q = Q - Q.mean(0)
    U, S, Vt = np.linalg.svd(P.T @ Q)
    d = np.sign(np.linalg.det(Vt.T @ U.T))
    R = Vt.T @ np.diag([1, 1, d]) @ U.T
    return np.sqrt(((P @ R.T - Q) ** 2).sum(1).mean())


def test_kabsch_matches_float64_reference_and_known_rotation():
    g = torch.Generator().manual_seed(3)
    B, M = 7, 13
    Q = torch.randn(M, 3, generator=g, dtype=torch.float64) * 5
    R = torch.stack([random_orthogonal(False, g) for _ in range(B)])
    shift = torch.randn(B, 1, 3, generator=g, dtype=torch.float64) * 20
    noise = torch.randn(B, M, 3, generator=g, dtype=torch.float64) * torch.linspace(0, 1, B).view(B, 1, 1)
    P = (Q + noise) @ R.transpose(1, 2) + shift
    got = motif_rmsd(P.float(), Q.float())
    want = np.array([_kabsch_numpy(P[b].numpy(), Q.numpy()) for b in range(B)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    # a rotated and translated copy superposes exactly; the noisy ones equal the noise's own RMSD bound
    assert float(got[0]) < 1e-4
    direct = (noise - noise.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).sqrt()
    assert bool((got.double() <= direct + 1e-5).all())


def test_kabsch_does_not_superpose_a_mirror_image():
    g = torch.Generator().manual_seed(4)
    Q = torch.randn(20, 3, generator=g, dtype=torch.float64) * 5
    mirror = Q @ random_orthogonal(True, g).T  # det -1: a reflection, not reachable by a rotation
    assert float(motif_rmsd(mirror, Q)[0]) > 1.0
    rotated = Q @ random_orthogonal(False, g).T
    assert float(motif_rmsd(rotated, Q)[0]) < 1e-9


def test_kabsch_rejects_nan_and_bad_shapes():
    Q = torch.randn(5, 3)
    with pytest.raises(ValueError, match="NaN"):
        motif_rmsd(torch.full((5, 3), float("nan")), Q)
    with pytest.raises(ValueError, match="expected"):
        motif_rmsd(torch.randn(2, 4, 3), Q)
    assert success_rate([0.5, 1.5, float("nan"), 0.99]) == 0.5


# ------------------------------------------------------------------------------------------ resampling

@pytest.mark.parametrize("resample", [systematic_resample, residual_resample], ids=["systematic", "residual"])
def test_resampling_keeps_count_and_is_unbiased(resample):
    """E[copies of i] = K w_i. Tolerance from the variance: 5 standard errors of the mean count."""
    K, reps = 16, 3000
    g = torch.Generator().manual_seed(5)
    w = torch.rand(K, generator=g, dtype=torch.float64) ** 3
    w[3] = 0.0  # a dead particle must never be copied
    w /= w.sum()
    counts = torch.zeros(reps, K, dtype=torch.float64)
    for r in range(reps):
        anc = resample(w, g)
        assert anc.shape == (K,) and anc.dtype == torch.long
        counts[r] = torch.bincount(anc, minlength=K).double()
    assert bool((counts.sum(1) == K).all())
    assert float(counts[:, 3].max()) == 0
    expected = K * w
    if resample is systematic_resample:  # each count is floor or ceil of K w_i
        assert bool(((counts >= expected.floor() - 1e-9) & (counts <= expected.ceil() + 1e-9)).all())
    se = counts.std(0) / math.sqrt(reps)
    err = (counts.mean(0) - expected).abs()
    assert bool((err <= 5 * se + 1e-9).all()), f"bias {err.max():.4f} > 5 SE {se.max():.4f}"


def test_unbiasedness_check_catches_a_biased_resampler():
    """The criterion above must fail for a wrong resampler (multinomial on w^2): it is not vacuous."""
    K, reps = 16, 3000
    g = torch.Generator().manual_seed(5)
    w = torch.rand(K, generator=g, dtype=torch.float64) ** 3
    w /= w.sum()
    counts = torch.stack([torch.bincount(torch.multinomial(w ** 2 / (w ** 2).sum(), K, True, generator=g),
                                         minlength=K).double() for _ in range(reps)])
    se = counts.std(0) / math.sqrt(reps)
    assert not bool(((counts.mean(0) - K * w).abs() <= 5 * se + 1e-9).all())


def test_resampling_bad_weights():
    for bad in (torch.tensor([float("nan"), 1.0]), torch.zeros(3), torch.tensor([-1.0, 2.0]), torch.tensor([])):
        with pytest.raises(ValueError, match="weights"):
            systematic_resample(bad)


def test_effective_sample_size():
    K = 8
    assert math.isclose(float(effective_sample_size(torch.full((K,), -math.log(K), dtype=torch.float64))), K)
    one = torch.full((K,), -1e300, dtype=torch.float64)
    one[2] = 0.0
    assert math.isclose(float(effective_sample_size(one)), 1.0)


# ------------------------------------------------------------------------------------------ replacement

def test_motif_trajectory_is_the_forward_process():
    """Row i is q(y_i | y_{i-1}) in the motif-centred subspace: centred, and its marginal at t matches
    q(y_t | y_0) = N(sqrt(ab_t) y_0, (1 - ab_t) D) (checked by moments over many designs)."""
    sch = DDPMScheduler(100, 1e-3, 0.1)
    sch.set_timesteps(20)
    asc = [0] + sch.timesteps.flip(0).tolist()
    M, D = 4, 4000
    y0 = torch.randn(M, 3, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(i) for i in range(D)]
    traj = motif_trajectory(sch, y0.expand(D, M, 3), gens, asc)
    assert float(traj.mean(2).abs().max()) < 1e-12
    ab = sch.schedule.alpha_bars
    for i in (3, 10, len(asc) - 1):
        t = asc[i]
        mean = math.sqrt(float(ab[t])) * (y0 - y0.mean(0))
        resid = traj[i] - mean
        var = float(resid.pow(2).mean()) * M / (M - 1)  # D has rank M - 1 per axis
        assert abs(float(resid.mean(0).abs().max())) < 5 * math.sqrt((1 - float(ab[t])) / D)
        assert abs(var / (1 - float(ab[t])) - 1) < 0.05


def test_replace_motif_keeps_centre_and_sets_shape():
    g = torch.Generator().manual_seed(1)
    x = remove_center_of_mass_reference(torch.randn(3, 10, 3, generator=g, dtype=torch.float64))
    idx = torch.tensor([[2, 3, 4], [0, 5, 9], [7, 8, 9]])
    shape = torch.randn(3, 3, 3, generator=g, dtype=torch.float64)
    shape = shape - shape.mean(1, keepdim=True)
    y = replace_motif(x, idx, shape)
    assert float(y.mean(1).abs().max()) < 1e-12  # still zero centre of mass
    got = y.gather(1, idx[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(got - got.mean(1, keepdim=True), shape, rtol=0, atol=1e-12)
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep.scatter_(1, idx, False)
    assert torch.equal(y[keep], x[keep])  # the scaffold is untouched


class _RecordingModel:
    """An eps model that records the motif shape it is shown at every call."""

    max_length = 64

    def __init__(self, positions):
        self.positions, self.seen = positions, []

    def __call__(self, x, t, mask):
        idx = self.positions[:, None].expand(-1, 3)
        shapes = torch.stack([xb.gather(0, idx) for xb in x])
        self.seen.append((int(t[0]), (shapes - shapes.mean(1, keepdim=True)).double()))
        return remove_center_of_mass_reference(0.1 * x, mask)


@pytest.mark.parametrize("method", ["replacement", "fixed", "smc"])
def test_model_sees_the_motif_exactly_at_its_noised_trajectory(method):
    """Replacement (and SMCDiff) show the model y_t for every t; fixed shows y_0; the trajectory is
    the one motif_trajectory draws from the design's seed."""
    from protdiff_fast.ops.ddpm_cpu import per_sample_seeds

    positions = torch.tensor([3, 4, 5, 9])
    model = _RecordingModel(positions)
    sch = DDPMScheduler(50, 1e-3, 0.2, backend="reference")
    y0 = torch.randn(4, 3, dtype=torch.float64)
    res = scaffold(model, y0, [12, 12], positions.expand(2, 4), method=method, particles=3, scheduler=sch, seed=7,
                   dtype=torch.float64)
    assert len(model.seen) == 50 and res.particles[0].shape == (3, 12, 3)
    seeds = per_sample_seeds(7, 2)
    gens = [torch.Generator().manual_seed(int(per_sample_seeds(int(s) ^ 0x11, 1)[0]) & ((1 << 63) - 1))
            for s in seeds]
    traj = motif_trajectory(sch, y0.expand(2, 4, 3), gens, list(range(51)))
    for t, shapes in model.seen:
        want = traj[0 if method == "fixed" else t]
        for d in range(2):
            torch.testing.assert_close(shapes[3 * d:3 * d + 3], want[d].expand(3, 4, 3), rtol=0, atol=1e-12)


def test_scaffold_bad_input():
    sch = DDPMScheduler(20, 1e-3, 0.2, backend="reference")
    model = _RecordingModel(torch.tensor([0, 1]))
    y0 = torch.randn(2, 3)
    ok = dict(scheduler=sch, dtype=torch.float64)
    with pytest.raises(ValueError, match="particles must be an integer >= 1"):
        scaffold(model, y0, [5], [[0, 1]], particles=0, **ok)
    with pytest.raises(ValueError, match="method"):
        scaffold(model, y0, [5], [[0, 1]], method="inpaint", **ok)
    with pytest.raises(ValueError, match="distinct positions"):
        scaffold(model, y0, [5], [[0, 5]], **ok)
    with pytest.raises(ValueError, match="max_length"):
        scaffold(model, y0, [100], [[0, 1]], **ok)
    # fractional positions / lengths were truncated (2.5 -> 2, 5.7 -> 5) and the run went on
    with pytest.raises(ValueError, match="motif_positions: integer positions expected"):
        scaffold(model, y0, [5], np.array([[0.0, 2.5]]), **ok)
    with pytest.raises(ValueError, match=r"lengths: whole numbers expected, got \[5.7\]"):
        scaffold(model, y0, [5.7], [[0, 1]], **ok)
    with pytest.raises(ValueError, match="NaN"):
        scaffold(model, torch.full((2, 3), float("nan")), [5], [[0, 1]], **ok)
    tempered = DDPMScheduler(20, 1e-3, 0.2, backend="reference", noise_scale=0.5)
    with pytest.raises(ValueError, match="noise_scale=0.5 with method 'smc'"):
        scaffold(model, y0, [5], [[0, 1]], scheduler=tempered, dtype=torch.float64)
    # SMC's weights need the ancestral transition: DDIM with eta < 1 made them wrong (eta 0: no weighting)
    ddim = DDPMScheduler(20, 1e-3, 0.2, backend="reference", eta=0.3)
    with pytest.raises(ValueError, match="eta=0.3 with method 'smc'"):
        scaffold(model, y0, [5], [[0, 1]], scheduler=ddim, dtype=torch.float64)
    # bf16 particle means are off by more than sigma_t near t = 1: the weights would follow rounding
    with pytest.raises(ValueError, match="float32 or float64.*AutocastEps"):
        scaffold(model, y0, [5], [[0, 1]], scheduler=sch, dtype=torch.bfloat16)


def test_scaffold_runs_under_the_models_own_schedule():
    """No scheduler: the model's T and betas (the shipped model's T = 1024; DDPMScheduler() is 1000), and
    a scheduler that differs from them is refused, as in sample()."""
    from protdiff_fast.cli import shipped_checkpoint
    from protdiff_fast.motif.scaffold import redenoise
    from protdiff_fast.train import load_model

    model = load_model(shipped_checkpoint(), backend="reference")
    y0 = torch.randn(3, 3) * 0.5
    seen = []

    class FirstCall(Exception):
        pass

    def recording(x, t, mask=None):  # the first step's t is all this test needs
        seen.append(int(t.max()))
        raise FirstCall

    model.forward = recording
    with pytest.raises(FirstCall):
        scaffold(model, y0, [8], [[2, 3, 4]], method="replacement", particles=1, num_inference_steps=3)
    assert seen == [1024] and model.config.num_timesteps == 1024
    with pytest.raises(ValueError, match="differs from the schedule this model was trained with"):
        scaffold(model, y0, [8], [[2, 3, 4]], method="replacement", particles=1, scheduler=DDPMScheduler(1000),
                 num_inference_steps=3)
    with pytest.raises(ValueError, match="differs from the schedule this model was trained with"):
        redenoise(model, [np.zeros((8, 3))], t_start=2, scheduler=DDPMScheduler(1000))


def test_nan_model_output_and_degenerate_weights_raise_clearly():
    sch = DDPMScheduler(20, 1e-3, 0.2, backend="reference")

    def nan_model(x, t, mask):
        out = torch.zeros_like(x)
        if int(t[0]) == 7:
            out[4] = float("nan")  # design 1 (K = 3), particle 1
        return out

    with pytest.raises(ScaffoldingError, match=r"NaN/Inf at t=7 for design 1 \(particle 1\)"):
        scaffold(nan_model, torch.randn(2, 3), [5, 5], [[0, 1], [0, 1]], particles=3, scheduler=sch,
                 dtype=torch.float64)

    def exploding_model(x, t, mask):  # finite eps, but the motif likelihood overflows for every particle
        spread = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1) - 2.0  # not a mere translation
        return (1e300 * spread * torch.where(mask, 1.0, 0.0)[..., None]).expand_as(x).contiguous()

    with pytest.raises(ScaffoldingError, match="weights of design 0 are NaN/Inf"):
        scaffold(exploding_model, torch.randn(2, 3), [5], [[0, 1]], particles=4, scheduler=sch,
                 dtype=torch.float64)

    def running_away(x, t, mask):  # finite outputs that push design 1's chains out without bound
        out = torch.zeros_like(x)
        out[3:] = -1e4 * x[3:]
        return out

    for method in ("replacement", "smc"):  # named as sample() names it, not as a NaN inside the model
        with pytest.raises(ScaffoldingError, match=r"design 1 \(particle \d, length 6\) diverged after the step at t="):
            scaffold(running_away, torch.randn(2, 3), [5, 6], [[0, 1], [0, 1]], particles=3, scheduler=sch,
                     method=method, dtype=torch.float64)


def _with_insertion_codes(tmp_path):
    """MOTIF_5TPN renumbered like an antibody loop: ..., 164, 165, 165A, 165B, 166, ... (file order kept)."""
    import gemmi

    st = gemmi.read_structure(str(MOTIF_5TPN))
    chain = st[0]["A"]
    plain = [r.seqid.num for r in chain]
    k = plain.index(166)
    for offset, r in enumerate(list(chain)[k:]):
        if offset < 2:
            r.seqid = gemmi.SeqId(165, "AB"[offset])
        else:
            r.seqid = gemmi.SeqId(plain[k + offset] - 2, " ")
    out = tmp_path / "icodes.pdb"
    st.write_pdb(str(out))
    ca = [[a.pos.x, a.pos.y, a.pos.z] for r in chain for a in r if a.name == "CA"]
    ids = [f"{r.seqid.num}{r.seqid.icode.strip()}" for r in chain if r.find_atom("CA", "*")]
    return out, np.array(ca), ids


def test_motif_ranges_include_residues_with_insertion_codes(tmp_path):
    path, ca, ids = _with_insertion_codes(tmp_path)
    spec = motif_spec(path, "10,A163-170,10")
    rows = list(range(ids.index("163"), ids.index("170") + 1))
    assert [ids[r] for r in rows][2:6] == ["165", "165A", "165B", "166"]
    assert spec.num_motif == len(rows) == 10  # 163..170 is 8 numbers, plus 165A and 165B
    np.testing.assert_array_equal(spec.motif_ca, ca[rows])
    assert spec.segments[1].length == 10 and spec.segments[1].count == 10
    layout = spec.sample_layout(0)
    assert layout.length == 30 and len(layout.motif_positions) == 10
    assert layout.contig(spec.segments) == "10,A163-170,10"
    # insertion codes in the contig address those residues; lower case is accepted
    two = motif_spec(path, "5,A165A-165b,5")
    np.testing.assert_array_equal(two.motif_ca, ca[[ids.index("165A"), ids.index("165B")]])
    one = motif_spec(path, "5,A165B,5")
    np.testing.assert_array_equal(one.motif_ca, ca[[ids.index("165B")]])
    both = motif_spec(path, "3,A163-165A,4,A165B-168,3")
    assert both.num_motif == 4 + 4


@pytest.mark.parametrize("contig, words", [
    ("5,A165C,5", r"no CA for residue\(s\) 165C"),
    ("5,A163-165A,4,A165A-168,5", "overlap"),
    ("5,A165B-165A,5", "not in order in the file"),  # 165A comes before 165B in this file
])
def test_motif_insertion_code_errors(tmp_path, contig, words):
    path, _, _ = _with_insertion_codes(tmp_path)
    with pytest.raises(ContigError, match=words):
        motif_spec(path, contig)


def test_insertion_codes_run_in_file_order_not_alphabetically(tmp_path):
    """Thrombin-style numbering 1C, 1B, 1A, 1, 2, ...: A1C-1A is forwards in the file (it was refused as
    running backwards, by comparing the codes alphabetically), and A1-3 with A1B do not overlap."""
    from test_io import chain_of, write_pdb

    res = chain_of(12)
    labels = [(1, "C"), (1, "B"), (1, "A")] + [(n, " ") for n in range(1, 10)]
    res = [(r[0], n, ic, r[3]) for r, (n, ic) in zip(res, labels)]
    path = write_pdb(tmp_path / "thrombin.pdb", res)
    spec = motif_spec(path, "3,A1C-1A,3")
    assert spec.num_motif == 3
    both = motif_spec(path, "3,A1-3,5,A1B,3")
    assert both.num_motif == 4
    with pytest.raises(ContigError, match="not in order in the file"):
        motif_spec(path, "3,A1A-1C,3")
    with pytest.raises(ContigError, match="overlap"):
        motif_spec(path, "3,A1C-1A,3,A1B,3")


def test_lower_case_insertion_codes_in_the_file_can_be_named(tmp_path):
    """A file with a lower-case insertion code (3a): the contig's codes are read in upper case, so A3a-4 was
    "the file has no residue 3A" and no contig could name the residue. Matched case-blind, it is 3a's CA."""
    from test_io import chain_of, write_pdb

    res = chain_of(7)
    labels = [(1, " "), (2, " "), (3, " "), (3, "a"), (4, " "), (5, " "), (6, " ")]
    res = [(r[0], n, ic, r[3]) for r, (n, ic) in zip(res, labels)]
    path = write_pdb(tmp_path / "lower.pdb", res)
    ca = np.array([r[3][1][1] for r in res])  # the CA of each residue, file order
    for contig in ("2,A3a-4,2", "2,A3A-4,2"):
        np.testing.assert_allclose(motif_spec(path, contig).motif_ca, ca[[3, 4]], atol=1e-3)
    np.testing.assert_allclose(motif_spec(path, "2,A3-4,2").motif_ca, ca[[2, 3, 4]], atol=1e-3)  # 3a inside the range


def test_segment_length_with_insertion_codes_needs_the_structure():
    seg = parse_contig("A52A-53")[0]
    assert seg == MotifSegment("A", 52, 53, "A", "")
    assert str(seg) == "A52A-53"
    with pytest.raises(ContigError, match="insertion codes"):
        seg.length


@pytest.mark.parametrize("method", ["smc", "replacement", "fixed"])
def test_scaffold_with_a_trainable_model_outside_no_grad(method):
    """scaffold() called as a user would, gradients enabled and a model with parameters: SMC crashed
    ("Can't call numpy() on Tensor that requires grad") and the other methods kept a graph over every step."""
    from protdiff_fast.models import ProtDiff
    from protdiff_fast.models.protdiff import ProtDiffConfig
    from protdiff_fast.motif import scaffold

    torch.manual_seed(0)
    model = ProtDiff(ProtDiffConfig(max_length=8, num_timesteps=20, hidden_dim=16, edge_dim=8, num_layers=2))
    assert torch.is_grad_enabled()
    res = scaffold(model, np.random.default_rng(0).normal(size=(3, 3)) * 0.38, [6], np.array([[0, 1, 2]]),
                   particles=2, num_inference_steps=5, method=method)
    for particles in res.particles:  # per design
        assert not (isinstance(particles, torch.Tensor) and particles.requires_grad)
        assert np.asarray(particles).shape[-2:] == (6, 3) and np.isfinite(np.asarray(particles)).all()
    assert torch.is_grad_enabled()


def test_redenoise_runs_without_a_graph_outside_no_grad():
    """redenoise() called as a user would, gradients on, with a trainable model: every step's activations
    stayed referenced by a graph over all t_start steps (memory growing with t_start)."""
    from protdiff_fast.models import ProtDiff
    from protdiff_fast.models.protdiff import ProtDiffConfig
    from protdiff_fast.motif.scaffold import redenoise

    torch.manual_seed(0)
    model = ProtDiff(ProtDiffConfig(max_length=8, num_timesteps=20, hidden_dim=16, edge_dim=8, num_layers=2))
    grad_in_model = []

    def recording(x, t, mask=None, _forward=model.forward):
        grad_in_model.append(torch.is_grad_enabled())
        return _forward(x, t, mask)

    model.forward = recording
    assert torch.is_grad_enabled()
    out = redenoise(model, [np.random.default_rng(0).normal(size=(6, 3))], t_start=3)
    assert grad_in_model == [False] * 3 and np.isfinite(out[0]).all()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("method", ["replacement", "fixed"])
def test_a_design_does_not_depend_on_the_other_designs_of_its_run(method):
    """Design d of a run is design d of a larger run with the same seed (as sample()'s designs), even
    where the larger run pads to a longer design: its noise and motif trajectory are drawn from
    streams of design d's own seed. (One noise stream per batch changed design 0 with --num.)"""
    sch = DDPMScheduler(40, 1e-3, 0.3, backend="reference")
    model = _RecordingModel(torch.tensor([1, 2, 3]))
    y0 = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kw = dict(method=method, particles=4, scheduler=sch, seed=11, dtype=torch.float64)
    small = scaffold(model, y0, [9, 12], [[1, 2, 3], [4, 5, 6]], **kw)
    large = scaffold(model, y0, [9, 12, 20], [[1, 2, 3], [4, 5, 6], [0, 7, 19]], **kw)
    for d in range(2):
        np.testing.assert_array_equal(large.particles[d], small.particles[d])
    other = scaffold(model, y0, [9, 12], [[1, 2, 3], [4, 5, 6]], **dict(kw, seed=12))
    assert not np.allclose(other.particles[0], small.particles[0])


@pytest.mark.parametrize("resampler", ["systematic", "residual"])
def test_smc_resampling_of_a_design_does_not_depend_on_the_other_designs(resampler):
    from motif_toy import N_MOTIF, N_NODES, make_problem

    problem = make_problem(T=60, beta_end=0.2)
    # float32: a batch mate's resampling rewrote these rows as mean + (x - mean), which in float64 rounded
    # back to x on this toy (exact subtraction of nearby values) and the change went unseen
    kw = dict(method="smc", particles=8, scheduler=problem["scheduler"], seed=3, dtype=torch.float32,
              resampler=resampler)
    runs = [scaffold(problem["model"], problem["motif"], [N_NODES] * D, np.tile(np.arange(N_MOTIF), (D, 1)), **kw)
            for D in (2, 8)]
    small, large = runs
    assert len(small.events) > 0  # the weights degenerated: the resampling draws are compared too
    assert [(e["step"], e["design"]) for e in small.events] == [(e["step"], e["design"]) for e in large.events
                                                                 if e["design"] < 2]
    # a step where a design of the large run's alone resampled while design 0 or 1 did not
    steps_of = lambda res, ds: {e["step"] for e in res.events if e["design"] in ds}  # noqa: E731
    assert steps_of(large, range(2, 8)) - steps_of(small, {0}) - steps_of(small, {1})
    for d in range(2):  # bit for bit: a batch mate's resampling touched the others' rows (mean + (x - mean))
        np.testing.assert_array_equal(large.particles[d], small.particles[d])
        np.testing.assert_array_equal(large.log_weights[d], small.log_weights[d])
        assert large.chosen[d] == small.chosen[d]


def test_redenoise_of_a_design_does_not_depend_on_the_other_designs():
    from protdiff_fast.motif.scaffold import redenoise

    sch = DDPMScheduler(30, 1e-3, 0.3, backend="reference")
    model = _RecordingModel(torch.tensor([0, 1]))
    g = torch.Generator().manual_seed(1)
    # the toy model and the reference step centre with torch's sums, whose bits follow the padded length
    designs = [torch.randn(n, 3, generator=g, dtype=torch.float64).numpy() for n in (8, 11, 11)]
    two = redenoise(model, designs[:2], t_start=20, scheduler=sch, seed=4, dtype=torch.float64)
    three = redenoise(model, designs, t_start=20, scheduler=sch, seed=4, dtype=torch.float64)
    for a, b in zip(two, three):
        np.testing.assert_array_equal(b, a)


# ------------------------------------------------------------------------------------------ contig edge cases

def test_contig_ranges_at_their_edges():
    """Off-by-one edges of the contig grammar: a scaffold range one backwards, motif segments sharing one
    residue, and the length of a parsed segment (its residues counted inclusively)."""
    with pytest.raises(ContigError, match="min 11 > max 10"):
        parse_contig("11-10,A1-5")
    assert parse_contig("10-10,A1-5")[0] == ScaffoldSegment(10, 10)
    with pytest.raises(ContigError, match="overlap"):
        parse_contig("A1-5,3,A5-9")  # residue 5 twice
    assert len(parse_contig("A1-5,3,A6-9")) == 3
    segs = parse_contig("A15-30,4,B7,A-3-4")
    assert [s.length for s in segs if isinstance(s, MotifSegment)] == [16, 1, 8]


def test_motif_spec_length_limits_take_the_tighter_of_contig_and_request():
    """The requested range is clipped to what the contig allows (19 motif + 10..20 + 10..20 = 39..59), so
    every layout is drawable; and a motif one residue longer than the maximum is named as such."""
    spec = motif_spec(MOTIF_5TPN, "10-20,A163-181,10-20", "30-80")
    assert (spec.min_length, spec.max_length) == (39, 59)
    assert all(39 <= spec.sample_layout(s).length <= 59 for s in range(50))
    with pytest.raises(ContigError, match="the motif has 19 residues, more than the maximum length 18"):
        motif_spec(MOTIF_5TPN, "0,A163-181,0", "18")


def test_a_motif_range_with_a_stray_residue_number_inside_is_refused(tmp_path):
    """File order 1, 2, 3, 50, 4, 5, 6: A2-5 would take residue 50 (which lies elsewhere in the chain)
    as a neighbour of 3 and 4; refused, naming it."""
    from test_io import chain_of, write_pdb

    res = chain_of(7)
    numbers = [1, 2, 3, 50, 4, 5, 6]
    res = [(r[0], n, r[2], r[3]) for r, n in zip(res, numbers)]
    path = write_pdb(tmp_path / "stray.pdb", res)
    with pytest.raises(ContigError, match=r"not in order in the file \(between them: 50\)"):
        motif_spec(path, "2,A2-5,2")
    ca = np.array([r[3][1][1] for r in res])
    np.testing.assert_allclose(motif_spec(path, "2,A4-6,2").motif_ca, ca[4:7], atol=1e-3)



def test_success_is_an_rmsd_strictly_below_the_threshold():
    """'Motif RMSD < 1 A' (the RFdiffusion benchmark's criterion): exactly 1 A is a failure."""
    assert success_rate([1.0, 0.999, 1.001]) == pytest.approx(1 / 3)
    assert success_rate([2.0], threshold=2.0) == 0.0 and success_rate([1.5], threshold=2.0) == 1.0
    Q = torch.tensor([[0.0, 0, 0], [2, 0, 0], [0, 3, 0], [0, 0, 4]], dtype=torch.float64)
    P = Q.clone()
    P[:, 0] *= -1.0  # a mirror image: no rotation maps it onto Q (a hand check of the d correction)
    # the best proper rotation of a mirror image reflects it through the plane of the two largest principal
    # axes: each point moves twice its component c_i along the smallest one, RMSD^2 = 4 lambda_min / M
    centred = (Q - Q.mean(0)).numpy()
    lam_min = np.linalg.eigvalsh(centred.T @ centred)[0]
    assert float(motif_rmsd(P, Q)[0]) == pytest.approx(math.sqrt(4 * lam_min / 4), rel=1e-9)
    assert float(motif_rmsd(Q, Q)[0]) < 1e-12


def test_designs_are_the_models_own_x0_and_unweighted_methods_report_uniform_weights():
    """The returned designs are the model's final x_0: the motif is imposed at every step down to t = 1, not
    pasted over at the end (then every design's motif RMSD would be 0 by construction). With the recording
    model (eps = 0.1 x) the last step rescales the motif rows, so their shape is not y_0's. Replacement and
    fixed report uniform normalised log-weights, -log K each."""
    positions = torch.tensor([3, 4, 5, 9])
    sch = DDPMScheduler(20, 1e-3, 0.2, backend="reference")
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for method in ("replacement", "fixed", "smc"):
        res = scaffold(_RecordingModel(positions), y0, [12, 12], positions.expand(2, 4), method=method, particles=3,
                       scheduler=sch, seed=7, dtype=torch.float64)
        for d in range(2):
            motif = res.design(d)[positions.numpy()]
            gap = np.abs((motif - motif.mean(0)) - (y0 - y0.mean(0)).numpy()).max()
            assert gap > 1e-3, (method, gap)
        np.testing.assert_allclose(np.exp(res.log_weights).sum(1), 1.0, rtol=1e-12)
        if method != "smc":
            np.testing.assert_allclose(res.log_weights, -math.log(3), rtol=0, atol=1e-15)
