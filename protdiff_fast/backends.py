"""Which backends exist here, and how ``backend="auto"`` chooses: one place for both.

Every fused op has up to three implementations with one signature:

* ``"reference"`` - plain torch, written for clarity; the ground truth (always available).
* ``"triton"``    - fused GPU kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``"cpu"``       - the C++/OpenMP extension ``protdiff_fast._C`` (CPU tensors).

``auto`` picks triton for CUDA tensors, cpu for CPU tensors, and falls back to the reference
when that backend is unavailable or does not implement the op yet. ``resolve`` returns the
name it picked; ``PROTDIFF_FAST_VERBOSE=1`` also logs every choice.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("reference", "triton", "cpu")

logger = logging.getLogger("protdiff_fast")


class BackendUnavailableError(RuntimeError, ValueError):
    """An explicit backend that cannot run an op on this device (a RuntimeError as before, and a ValueError:
    a bad option of the caller's, which the command line reports as one)."""


class BackendUnavailableWarning(RuntimeWarning):
    """A fast path could not be loaded; the library keeps working on the others."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


@functools.lru_cache(maxsize=None)
def _load_cpu_extension():
    """Import ``protdiff_fast._C`` once; on failure warn once and remember why."""
    try:
        from protdiff_fast import _C  # noqa: WPS433 (import inside function on purpose)
    except ImportError as err:
        reason = f"the C++ extension protdiff_fast._C could not be imported ({err})"
        warnings.warn(
            f"protdiff_fast: CPU fast path unavailable: {reason}. Falling back to the reference "
            "backend on CPU. Reinstall with `pip install -e .` (needs a C++17 compiler and CMake) to build it.",
            BackendUnavailableWarning,
            stacklevel=3,
        )
        return None, reason
    return _C, "C++ extension loaded"


def cpu_extension():
    """The loaded ``protdiff_fast._C`` module, or None (after one warning) when it is missing."""
    return _load_cpu_extension()[0]


@functools.lru_cache(maxsize=None)
def _triton_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not installed ({err}); `pip install protdiff-fast[triton]`"
    return True, f"triton {triton.__version__}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def status() -> Dict[str, BackendStatus]:
    """Availability of each backend on this machine, with the reason."""
    ext_module, ext_reason = _load_cpu_extension()
    triton_ok, triton_reason = _triton_status()
    if triton_ok and not torch.cuda.is_available() and not _interpreting():
        triton_reason += " (no CUDA device; CPU tensors need TRITON_INTERPRET=1)"
    return {
        "reference": BackendStatus("reference", True, "plain torch"),
        "triton": BackendStatus("triton", triton_ok, triton_reason),
        "cpu": BackendStatus("cpu", ext_module is not None, ext_reason),
    }


# op name -> backend -> "module:function". Filled in as the backends land; import is lazy so
# that a missing optional dependency only matters when that backend is asked for.
_REGISTRY: Dict[str, Dict[str, str]] = {
    "remove_center_of_mass": {
        "reference": "protdiff_fast.reference.com:remove_center_of_mass_reference",
        "cpu": "protdiff_fast.ops.com_cpu:remove_center_of_mass_cpu",
    },
    "egnn_pair_aggregate": {
        "reference": "protdiff_fast.reference.egnn:egnn_pair_aggregate_reference",
        "triton": "protdiff_fast.ops.egnn_triton:egnn_pair_aggregate_triton",
        "cpu": "protdiff_fast.ops.egnn_cpu:egnn_pair_aggregate_cpu",
    },
    "ddpm_step": {
        "reference": "protdiff_fast.reference.ddpm:ddpm_step_reference",
        "triton": "protdiff_fast.ops.ddpm_triton:ddpm_step_triton",
        "cpu": "protdiff_fast.ops.ddpm_cpu:ddpm_step_cpu",
    },
}


def implemented(op: str) -> Tuple[str, ...]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
    return tuple(b for b in BACKENDS if b in _REGISTRY[op])


def _usable(backend: str, device: torch.device) -> Tuple[bool, str]:
    st = status()[backend]
    if not st.available:
        return False, st.reason
    if backend == "cpu" and device.type != "cpu":
        return False, f"the cpu backend takes CPU tensors, got device {device}"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return False, f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {device}"
    return True, st.reason


def check_backend_name(backend) -> str:
    """``backend`` if it names a backend (or "auto"), else a ValueError listing them: a module or
    scheduler built with a typo fails when it is built, not at its first call."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    return backend


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """The backend that runs ``op`` on ``device`` when ``backend`` is asked for.

    An explicit backend that cannot run here raises (naming why); ``"auto"`` never does.
    """
    device = torch.device(device)
    have = implemented(op)
    if backend == "auto":
        preferred = "triton" if device.type == "cuda" else "cpu"
        chosen = "reference"
        if preferred in have and _usable(preferred, device)[0]:
            chosen = preferred
        if os.environ.get("PROTDIFF_FAST_VERBOSE", "0") not in ("", "0"):
            logger.warning("protdiff_fast: %s on %s -> backend %r", op, device, chosen)
        return chosen
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if backend not in have:
        raise NotImplementedError(f"{op} has no {backend!r} backend yet (implemented: {', '.join(have)})")
    ok, why = _usable(backend, device)
    if not ok:
        raise BackendUnavailableError(f"backend {backend!r} cannot run {op} here: {why}")
    return backend


def get_impl(op: str, backend: str, device: torch.device | str) -> Tuple[str, Callable]:
    """Resolve ``backend`` and return ``(name, function)``."""
    name = resolve(op, backend, device)
    module_name, fn_name = _REGISTRY[op][name].split(":")
    return name, getattr(importlib.import_module(module_name), fn_name)


def describe(device: Optional[torch.device | str] = None) -> str:
    """A human-readable table of backends and of what ``auto`` picks per op."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lines = ["backend     available  why"]
    for st in status().values():
        lines.append(f"{st.name:<11} {'yes' if st.available else 'no':<10} {st.reason}")
    lines.append(f"\nauto on {device}:")
    for op in _REGISTRY:
        lines.append(f"  {op:<24} -> {resolve(op, 'auto', device):<10} (implemented: {', '.join(implemented(op))})")
    return "\n".join(lines)
