"""The benchmark cases: ``egnn`` (the fused pair aggregation; and, layer against layer,
egnn-pytorch's dense ``EGNN`` and our drop-in for it, ``compat``, forward or forward+backward),
``ddpm-step``, ``sampler``, ``sampler-mixed`` (a whole sampling run: mixed lengths, batching, files
and manifest) and ``train-step``.

FLOPs of the op rows, per real pair (i != j), are the pair MLP's two H x H products: 4 H^2 forward,
8 H^2 backward (4 products), so 12 H^2 for forward+backward; the backward's recomputation of the
forward is work the kernel does but not counted as useful. Elementwise work is not counted.

The layer rows (``egnn-pytorch``, ``compat``) compute another, larger function: egnn-pytorch's
``EGNN(dim=H, m_dim=H)`` has an edge MLP of width 2 D_in = 4 H + 2 and a coordinate MLP of width 4 H
on every ordered pair (j = i included), about 8x the op's pair products at any H. Their FLOPs are
that layer's own (``layer_flops``), the same for both, so their rates compare with each other; their
time is not comparable with an op row's (``compat`` against ``egnn-pytorch`` is the drop-in's speed-up).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

PROVIDERS = ("reference", "cpu", "triton", "egnn-pytorch", "compat", "egnn-pytorch-m16", "compat-m16")
LAYER_PROVIDERS = ("egnn-pytorch", "compat")  # whole egnn-pytorch-shaped layers, not the op: EGNN(dim=H, m_dim=H)
# the same two layers at egnn-pytorch's own default message width, EGNN(dim=H, m_dim=16): provider -> (layer, m_dim)
DEFAULT_M_PROVIDERS = {"egnn-pytorch-m16": ("egnn-pytorch", 16), "compat-m16": ("compat", 16)}


def layer_spec(provider: str) -> Optional[Tuple[str, Optional[int]]]:
    """(layer provider, m_dim or None for m_dim = H) of an egnn-pytorch-shaped layer row, else None (the op)."""
    if provider in LAYER_PROVIDERS:
        return provider, None
    return DEFAULT_M_PROVIDERS.get(provider)


def flops(B: int, N: int, H: int, mode: str) -> float:
    """The op's useful FLOPs (module docstring)."""
    per_pair = 4 * H * H if mode == "fwd" else 12 * H * H
    return float(B * N * (N - 1) * per_pair)


def layer_flops(B: int, N: int, H: int, mode: str, m_dim: Optional[int] = None) -> float:
    """egnn-pytorch ``EGNN(dim=H, m_dim=m_dim or H)``'s pair products on all N^2 ordered pairs (as it
    computes them): edge MLP D_in -> 2 D_in -> M (D_in = 2 H + 1), coordinate MLP M -> 4 M -> 1; twice
    that backward (input and weight gradients) as for the op. Node MLP (O(N H^2)) not counted."""
    M = H if m_dim is None else m_dim
    d_in = 2 * H + 1
    macs = d_in * 2 * d_in + 2 * d_in * M + M * 4 * M + 4 * M
    return float(B * N * N * 2 * macs * (1 if mode == "fwd" else 3))


def row_flops(provider: str, B: int, N: int, H: int, mode: str) -> float:
    spec = layer_spec(provider)
    return layer_flops(B, N, H, mode, m_dim=spec[1]) if spec else flops(B, N, H, mode)


def egnn_pytorch_available() -> bool:
    try:
        import egnn_pytorch  # noqa: F401
    except Exception:
        return False
    return True


def make_case(provider: str, B: int, N: int, H: int, mode: str, dtype: torch.dtype, device: str,
              K: int = 64, m_dim: Optional[int] = None) -> Callable[[], None]:
    """A closure that runs one forward (and backward when mode == "fwdbwd") of the chosen provider.

    The inputs are those of a ProtDiff layer: relative-offset edges (table of 2K + 1 rows),
    attention off, normalize on, mean coordinate aggregation, no padding. The layer providers build
    egnn-pytorch's ``EGNN(dim=H, m_dim=m_dim or H)`` (its own default is m_dim = 16).

    "fwd" is inference for every provider: nothing requires grad, so no autograd graph is recorded
    (the layers' parameters included: with them requiring grad, egnn-pytorch's forward kept all its
    (B, N, N, 4H + 2) activations for a backward that never came: 1.7-1.8x its inference peak at
    H = 64). "fwdbwd" computes the gradients of every input and parameter and frees them (``.grad = None``) instead of
    accumulating into them across repetitions: each call allocates its own, as the first one does.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    need_grad = mode == "fwdbwd"

    def r(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(need_grad)

    if layer_spec(provider):
        provider, m_dim = layer_spec(provider)[0], m_dim or layer_spec(provider)[1]
        # the same weights in every run and for both layers (their values set how much of SiLU saturates,
        # which a timing does not depend on, but a row's inputs should not vary between runs)
        torch.manual_seed(0)
        if provider == "egnn-pytorch":
            from egnn_pytorch import EGNN as DenseEGNN  # the layer most users start from

            layer = DenseEGNN(dim=H, m_dim=m_dim or H)
        else:  # our drop-in: the same constructor and function, its pair part through the fused op
            from protdiff_fast.nn.compat import EGNN as DropIn

            # the fused backend by name: "auto" ran the reference, silently, where the fused one could not
            # (no C++ extension, no triton, widths beyond the kernels'), and the row still said "compat"
            fused = "triton" if str(device).startswith("cuda") else "cpu"
            layer = DropIn(dim=H, m_dim=m_dim or H, backend=fused)
        layer = layer.to(device=device, dtype=dtype).requires_grad_(need_grad)
        feats, coors = r(B, N, H), r(B, N, 3)
        leaves = [feats, coors, *layer.parameters()]

        def run() -> None:
            h, x = layer(feats, coors)
            if need_grad:
                (h.sum() + x.sum()).backward()
                for t in leaves:  # freed, not accumulated into by the next repetition
                    t.grad = None

        return run

    from protdiff_fast.ops import egnn_pair_aggregate

    args = [r(B, N, 3), r(B, N, H), r(B, N, H), r(H, scale=0.1), r(H, H, scale=H ** -0.5), r(H),
            r(H, H, scale=H ** -0.5), r(H), r(H, scale=H ** -0.5)]
    rel = r(2 * K + 1, H)

    def run() -> None:
        m, dx = egnn_pair_aggregate(*args, rel=rel, normalize=True, backend=provider)
        if need_grad:
            (m.sum() + dx.sum()).backward()
            for t in (*args, rel):  # freed, not accumulated into by the next repetition
                t.grad = None

    return run


def ddpm_step_bytes(B: int, N: int) -> float:
    """Bytes a fused step must move: read x_t and eps_hat, write x_{t-1}, the mean and x_0 (fp32)."""
    return float(B * N * 3 * 4 * 5)


# the step moves little data per call: repeated calls over one buffer would time the cache, so the rows
# cycle through input sets adding up to at least this many bytes (METHOD.md: rotate among input sets)
ROTATE_BYTES = 1 << 28
MAX_INPUT_SETS = 64


def input_sets(set_bytes: int) -> int:
    return int(min(MAX_INPUT_SETS, max(2, -(-ROTATE_BYTES // max(set_bytes, 1)))))


def make_ddpm_step_case(provider: str, B: int, N: int, dtype: torch.dtype, device: str,
                        graphs: bool = False) -> Callable[[], None]:
    """One batched ancestral step with in-kernel (or generator) noise, at mid-trajectory timesteps,
    each call on the next of ``input_sets`` input sets (x_t, eps_hat, t). With ``graphs`` (CUDA) the
    step is captured once per input set and replayed in turn: the kernels' time without the per-call
    host work (input checks, coefficient gathers' launches), i.e. what the sampler's captured loop pays."""
    from protdiff_fast.diffusion import NoiseSchedule
    from protdiff_fast.ops import ddpm_step

    g = torch.Generator(device="cpu").manual_seed(0)
    schedule = NoiseSchedule(1000)
    seeds = torch.arange(B, device=device)
    sets = []
    for _ in range(input_sets(2 * B * N * 3 * torch.empty((), dtype=dtype).element_size())):
        sets.append((torch.randn(B, N, 3, generator=g).to(device=device, dtype=dtype),
                     torch.randn(B, N, 3, generator=g).to(device=device, dtype=dtype),
                     torch.randint(2, 1001, (B,), generator=g).to(device)))

    def step(k: int) -> None:
        x, eps, t = sets[k]
        ddpm_step(schedule, x, eps, t, seed=seeds if provider != "reference" else 0, backend=provider)

    calls = [0]

    def run() -> None:
        step(calls[0] % len(sets))
        calls[0] += 1

    if not graphs:
        return run
    if not str(device).startswith("cuda") or provider == "reference":
        raise ValueError("ddpm-step graphs rows: a fused provider on CUDA only (the reference draws host noise)")
    from protdiff_fast._checks import skip_value_checks

    replays = []

    def capture() -> None:  # on the first call (the worker's warm-up), so its memory is measured as the row's
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), skip_value_checks():
            for k in range(len(sets)):
                step(k)
        torch.cuda.current_stream().wait_stream(side)
        for k in range(len(sets)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), skip_value_checks():
                step(k)
            replays.append(graph.replay)

    def replay() -> None:
        if not replays:
            capture()
        replays[calls[0] % len(replays)]()
        calls[0] += 1

    return replay


def make_train_step_case(provider: str, B: int, N: int, H: int, dtype: torch.dtype, device: str,
                         autocast: Optional[torch.dtype] = None) -> Callable[[], None]:
    """One training step's forward + backward of the ProtDiff model (4 layers, edge width H); with
    ``autocast`` the forward runs under torch.autocast in that dtype, as ``protdiff-fast train`` does on GPU."""
    from protdiff_fast.models import ProtDiff

    torch.manual_seed(0)
    model = ProtDiff(hidden_dim=H, edge_dim=H, num_layers=4, max_length=max(N, 128), backend=provider)
    model = model.to(device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, N, 3, generator=g).to(device=device, dtype=dtype)
    t = torch.randint(1, 1025, (B,), generator=g).to(device)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)

    def run() -> None:
        with torch.autocast(torch.device(device).type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(x, t, mask).float().pow(2).sum()
        loss.backward()
        # freed after the step, not before the next: the parameter gradients are part of the step's own
        # memory (held from the previous repetition, they sat in the worker's baseline and went uncounted)
        model.zero_grad(set_to_none=True)

    return run


SAMPLER_STEPS = 20  # denoising steps timed per repetition; backbones/s is derived for T = 1000


def make_sampler_case(provider: str, B: int, N: int, H: int, dtype: torch.dtype, device: str,
                      graphs: bool = False, autocast: Optional[torch.dtype] = None) -> Callable[[], None]:
    """SAMPLER_STEPS reverse steps (model + step) of a batch of B backbones of length N.

    ``provider`` picks the backend of both the EGNN and the step ("reference" or "cpu"/"triton");
    the model is a fixed small ProtDiff (H, 4 layers) with random weights. ``graphs`` runs the
    sampler's own step runner (:class:`protdiff_fast.diffusion.graphs.DenoiseStep`), which captures
    model + step as one CUDA graph (captured in the warm-up run, replayed in the timed ones).
    ``autocast``: the model runs under torch.autocast in that dtype (as ``sample --autocast``), the
    step in ``dtype``.
    """
    from protdiff_fast.diffusion import NoiseSchedule
    from protdiff_fast.models import ProtDiff
    from protdiff_fast.ops import ddpm_step

    torch.manual_seed(0)
    model = ProtDiff(hidden_dim=H, edge_dim=H, num_layers=4, max_length=max(N, 128), backend=provider)
    model = model.to(device=device, dtype=dtype).eval()
    schedule = NoiseSchedule(1000)
    x0 = torch.randn(B, N, 3, device=device, dtype=dtype) * 0.1
    seeds = torch.arange(B, device=device)

    if graphs:
        from protdiff_fast.diffusion import DDPMScheduler
        from protdiff_fast.diffusion.graphs import DenoiseStep

        scheduler = DDPMScheduler(1000, backend=provider)
        mask = torch.ones(B, N, dtype=torch.bool, device=device)
        runner = DenoiseStep(model, scheduler, mask, seeds=seeds.long(), capture=True, autocast=autocast)

        def run_graphed() -> torch.Tensor:
            x = x0
            for k in range(SAMPLER_STEPS):
                _, x = runner(x, torch.full((B,), 1000 - k, dtype=torch.long, device=device))
            return x

        return run_graphed

    def run() -> torch.Tensor:
        x = x0
        with torch.no_grad():
            for k in range(SAMPLER_STEPS):
                t = torch.full((B,), 1000 - k, dtype=torch.long, device=device)
                with torch.autocast(torch.device(device).type, dtype=autocast or torch.bfloat16,
                                    enabled=autocast is not None, cache_enabled=False):
                    eps = model(x, t).to(x.dtype)
                x = ddpm_step(schedule, x, eps, t, seed=seeds if provider != "reference" else k,
                              backend=provider).prev_sample
        return x

    return run


# a whole `protdiff-fast sample` run, kept small enough for a CPU: the shipped model, strided to
# SAMPLER_MIXED_STEPS reverse steps, lengths spread over N/2..N, batches of SAMPLER_MIXED_BATCH
SAMPLER_MIXED_STEPS = 50
SAMPLER_MIXED_BATCH = 8


def sampler_mixed_lengths(B: int, N: int):
    """B design lengths spread evenly over N/2 .. N, in a shuffled (but fixed) order."""
    import numpy as np

    lengths = np.linspace(max(2, N // 2), N, B).round().astype(int)
    return [int(v) for v in np.random.default_rng(0).permutation(lengths)]


def make_sampler_mixed_case(provider: str, B: int, N: int, H: int, dtype: torch.dtype, device: str,
                            write: bool = True) -> Callable[[], None]:
    """``sample()`` of B designs of mixed lengths end to end: length-sorted batches of
    SAMPLER_MIXED_BATCH, SAMPLER_MIXED_STEPS strided steps of the shipped ProtDiff (``provider``
    picks the EGNN and step backend), and with ``write`` the PDB files, per-design metrics and the
    manifest in a fresh folder per repetition (the previous repetition's is deleted at the start of the
    next, inside its timing: a few ms against seconds; the last one when the worker exits).
    ``H`` is the shipped model's (64); other values are refused.
    """
    import atexit
    import shutil
    import tempfile

    from protdiff_fast.cli import shipped_checkpoint
    from protdiff_fast.diffusion import DDPMScheduler
    from protdiff_fast.diffusion.sampler import sample
    from protdiff_fast.train import load_model

    model = load_model(shipped_checkpoint(), backend=provider, device=device).to(dtype=dtype)
    cfg = model.config
    if H != cfg.hidden_dim:
        raise ValueError(f"sampler-mixed uses the shipped model (H={cfg.hidden_dim}), not H={H}")
    lengths = sampler_mixed_lengths(B, N)
    folders = []
    atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for f in folders])  # the last one's files

    def run() -> None:
        if folders:  # the previous repetition's files
            shutil.rmtree(folders.pop(), ignore_errors=True)
        out = tempfile.mkdtemp(prefix="protdiff-bench-") if write else None
        if out:
            folders.append(out)
        scheduler = DDPMScheduler(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, backend=provider)
        with torch.no_grad():
            sample(model, lengths, batch_size=SAMPLER_MIXED_BATCH, seed=0, scheduler=scheduler,
                   num_inference_steps=SAMPLER_MIXED_STEPS, device=device, dtype=dtype, progress=False,
                   out_dir=None if out is None else out + "/designs")

    return run


def train_step_flops(B: int, N: int, H: int) -> float:
    return 4 * flops(B, N, H, "fwdbwd")


SUITES: Dict[str, Callable] = {"egnn": make_case, "ddpm-step": make_ddpm_step_case, "train-step": make_train_step_case,
                               "sampler": make_sampler_case, "sampler-mixed": make_sampler_mixed_case}
