"""Input validation shared by every op: clear errors naming the argument, never a silent wrong answer."""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_state = threading.local()


def value_checks_enabled() -> bool:
    return getattr(_state, "value_checks", True)


@contextlib.contextmanager
def skip_value_checks():
    """Skip the checks that read tensor values (NaN/Inf, mask contents, timestep range) inside this
    block; shapes, dtypes and devices are still checked. Each skipped check is a device-to-host sync,
    which a CUDA graph capture cannot contain: the sampler validates its inputs once and checks the
    outputs of every step itself, then runs model + step with these off (and captures them on GPU)."""
    before = value_checks_enabled()
    _state.value_checks = False
    try:
        yield
    finally:
        _state.value_checks = before


def _fmt_shape(shape: Sequence[Optional[int]]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def check_tensor(
    name: str,
    t: object,
    shape: Sequence[Optional[int]],
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    floating: bool = True,
) -> torch.Tensor:
    """Check type, shape (None = any size), dtype and device of one argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise ValueError(f"{name}: expected shape {_fmt_shape(shape)}, got {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of the other inputs), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: is on device {t.device}, but the other inputs are on {device}")
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    # One reduction instead of a bool tensor and an all(): NaN and Inf propagate through a sum, so a
    # finite sum proves every entry finite; a non-finite sum (also the rare overflow of a sum of huge
    # finite values) falls through to the exact check.
    if t.numel() == 0 or not value_checks_enabled() or bool(torch.isfinite(t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64
                                                              else torch.float32))):
        return
    if not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name}: contains {bad} values")


def check_all_finite(named: Sequence[tuple], mask: Optional[torch.Tensor] = None) -> None:
    """``check_finite`` for several (name, tensor) pairs with one device-to-host read instead of one each
    (on a GPU every read is a sync): their sums in one small tensor; only when one is non-finite are
    the tensors checked one by one, so the error still names the first bad argument. With a bool (B, N)
    ``mask`` (from ``check_mask(..., check_empty=False)``), its check for samples without real nodes
    joins the same read (and is reported first, as ``check_mask`` would)."""
    named = [(n, t) for n, t in named if t is not None and t.numel() > 0]
    if not value_checks_enabled():
        return
    parts = [t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).to(torch.float64)
             for _, t in named]
    total = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)
    if mask is not None and mask.numel() > 0:
        total, empty = torch.stack([total, (~mask.any(dim=1)).any().to(total.device, torch.float64)]).tolist()
        if empty:
            check_mask(mask, mask.shape[0], mask.shape[1], mask.device)  # raises, naming the samples
    elif not parts:
        return
    else:
        total = float(total)
    if math.isfinite(total):
        return
    for name, t in named:
        check_finite(name, t)


def check_mask(mask: Optional[torch.Tensor], batch: int, num_nodes: int, device: torch.device,
               check_empty: bool = True) -> torch.Tensor:
    """Return a bool (B, N) mask (all real when None); every sample must have a real node (checked here
    unless ``check_empty`` is False: then the caller passes the mask to ``check_all_finite``)."""
    if mask is None:
        return torch.ones(batch, num_nodes, dtype=torch.bool, device=device)
    check_tensor("mask", mask, (batch, num_nodes), device=device, floating=False)
    if mask.dtype != torch.bool:
        if value_checks_enabled() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask: expected booleans or 0/1 values")
        mask = mask != 0
    if not value_checks_enabled() or (not check_empty and num_nodes > 0):
        return mask
    if batch > 0 and num_nodes > 0:
        empty = (~mask.any(dim=1)).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"mask: sample(s) {empty.tolist()[:8]} have no real nodes (all padding)")
    elif batch > 0:
        raise ValueError("mask: samples have no nodes (N = 0)")
    return mask


def first_order_backward(backend: str):
    """Decorator for a fused op's ``autograd.Function.backward`` whose kernels' gradients are not
    themselves differentiable: a backward with ``create_graph=True`` (grad mode on inside it) raises
    instead of returning gradients that a second derivative would silently treat as constants
    (``once_differentiable`` does not catch ``torch.autograd.grad(..., inputs=x)``: it prunes the
    error node)."""
    def wrap(backward):
        @functools.wraps(backward)
        def checked(ctx, *grad_outputs):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"egnn_pair_aggregate: the {backend} backend's gradients are first order only "
                    "(backward with create_graph=True, e.g. for a second derivative or a gradient penalty); "
                    "use backend='reference' for higher-order gradients")
            return backward(ctx, *grad_outputs)
        return checked
    return wrap


def check_device(device) -> torch.device:
    """``device`` as a torch.device, or a ValueError naming the problem (not a name torch knows; a CUDA
    device on a machine without one)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a device torch knows (cpu, cuda, cuda:1, ...)") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r}: protdiff_fast runs on cpu and cuda devices")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r}, but torch sees no CUDA GPU here (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return dev
