"""Written JSON is strict: NaN/Infinity become null (strict parsers reject the bare tokens)."""
import json

import numpy as np
import pytest

from protdiff_fast.io.jsonio import dumps_strict


def test_non_finite_numbers_become_null_everywhere():
    obj = {"a": float("nan"), "b": [1.5, float("inf"), {"c": np.float32("-inf")}], "d": np.float64(2.0), "e": "nan"}
    text = dumps_strict(obj)
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard token {name}"))
    assert back == {"a": None, "b": [1.5, None, {"c": None}], "d": 2.0, "e": "nan"}


def test_cli_refuses_an_unwritable_output_with_a_message(tmp_path, capsys):
    import os

    from protdiff_fast.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind, use a file as folder
            target = tmp_path / "a_file"
            target.write_text("x")
            out = target / "designs"
        else:
            out = locked / "designs"
        rc = main(["sample", "--length", "12", "--num", "1", "--steps", "2", "--out", str(out), "--no-progress"])
    finally:
        os.chmod(locked, 0o700)
    assert rc == 2
    assert "error:" in capsys.readouterr().err


def test_numpy_integers_booleans_and_arrays_are_written_as_json():
    # json.dumps raised TypeError on them (at the end of a run, losing its summary); NaN inside an array too
    obj = {"n": np.int64(3), "ok": np.bool_(True), "xs": np.array([[1.5, np.nan], [np.inf, -2.0]], np.float32),
           "ids": np.arange(3, dtype=np.int32), "t": (np.uint8(7), np.float16(0.5))}
    back = json.loads(dumps_strict(obj), parse_constant=lambda name: pytest.fail(f"non-standard token {name}"))
    assert back == {"n": 3, "ok": True, "xs": [[1.5, None], [None, -2.0]], "ids": [0, 1, 2], "t": [7, 0.5]}
    assert type(back["n"]) is int and type(back["ok"]) is bool
