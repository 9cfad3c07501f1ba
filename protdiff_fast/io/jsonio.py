"""JSON that every parser reads: NaN and Infinity (which Python's json writes by default, and
strict parsers such as JavaScript's reject) become null."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (also numpy scalars) replaced by None, recursively; numpy
    integers, booleans and arrays become Python ints, bools and lists (json.dumps raised TypeError on
    them, after the run whose summary it was writing had done all its work)."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def dumps_strict(obj: Any, **kwargs) -> str:
    """json.dumps with non-finite numbers as null (never the non-standard NaN / Infinity tokens)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
