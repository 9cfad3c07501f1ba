"""Work around a race in torch's CPU math: resolve MKL VML's per-function dispatch on one thread.

torch's CPU float32/float64 unary ops (sqrt, exp, log, sin, tanh, ...) call MKL VML from every intra-op
thread on its chunk of the tensor. oneMKL 2024.2 (the version in the torch 2.13 CPU wheel) picks each
VML function's kernel lazily on that function's first call; when the first call is a parallel one, one
thread can run a low-accuracy kernel for its whole chunk (pytorch/pytorch#188792, fix proposed in
#188791). Measured here (2-core AMD EPYC, torch 2.13.0+cpu, 2 threads): the first float64 ``torch.sin``
on 8,200 elements in a fresh process was wrong by up to 7e-9 (relative, about 3e7 ulp) on one thread's
half in 1 process of 60; the model built its fixed tables with it, so two processes' models differed
in the last float32 bits and ``train --resume`` was not bit-for-bit. Later calls are right, so a
one-element call of each function and dtype (too small to be split over threads) at import makes
every later call take the accurate kernel, as the upstream fix does.
"""
from __future__ import annotations

import torch

# every unary op that ATen may route to VML (aten/src/ATen/cpu/vml.h), and a few it may route there later
_VML_OPS = ("abs", "acos", "asin", "atan", "ceil", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1",
            "floor", "lgamma", "log", "log10", "log1p", "log2", "neg", "reciprocal", "round", "rsqrt",
            "sigmoid", "sin", "sinh", "sqrt", "tan", "tanh", "trunc")

_done = False


def warm_up_vml() -> tuple:
    """Call each op of ``_VML_OPS`` once on a one-element float32 and float64 tensor (once per
    process; a few hundred microseconds). Returns the (op, dtype) pairs called."""
    global _done
    called = []
    if _done or not torch.backends.mkl.is_available():
        return tuple(called)
    one = {dtype: torch.full((1,), 0.5, dtype=dtype) for dtype in (torch.float32, torch.float64)}
    for name in _VML_OPS:
        fn = getattr(torch, name, None)
        if fn is None:
            continue
        for dtype, value in one.items():
            fn(value)
            called.append((name, dtype))
    _done = True
    return tuple(called)
