"""Import, backend selection, the missing-extension path and the command line."""
import subprocess
import sys
import textwrap

import pytest
import torch

import protdiff_fast
from protdiff_fast import backends
from protdiff_fast.cli import main


def test_backend_resolution_rules():
    has_ext = backends.cpu_extension() is not None
    assert backends.resolve("egnn_pair_aggregate", "auto", "cpu") == ("cpu" if has_ext else "reference")
    assert backends.resolve("egnn_pair_aggregate", "reference", "cpu") == "reference"
    with pytest.raises(NotImplementedError, match="has no 'triton' backend yet"):
        backends.resolve("remove_center_of_mass", "triton", "cpu")
    assert backends.resolve("egnn_pair_aggregate", "triton", "cpu") == "triton"  # interpreted (conftest)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        backends.resolve("egnn_pair_aggregate", "cuda", "cpu")
    with pytest.raises(ValueError, match="unknown op"):
        backends.resolve("flash_attention", "auto", "cpu")
    if backends.cpu_extension() is not None:
        with pytest.raises(RuntimeError, match="takes CPU tensors, got device meta"):
            backends.resolve("remove_center_of_mass", "cpu", "meta")
    assert backends.resolve("remove_center_of_mass", "auto", "meta") == "reference"


def test_layer_reports_its_backend():
    layer = protdiff_fast.EGNNLayer(8)
    assert layer.backend_for("cpu") == ("cpu" if backends.cpu_extension() is not None else "reference")
    assert protdiff_fast.EGNNLayer(8, backend="reference").backend_for("cpu") == "reference"
    assert "backend='auto'" in repr(layer)


MISSING_EXTENSION_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys, warnings

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "protdiff_fast._C":
                raise ImportError("simulated: no compiled extension")
            return None

    sys.meta_path.insert(0, Block())
    warnings.simplefilter("default")
    import torch
    import protdiff_fast
    from protdiff_fast import backends
    st = backends.status()["cpu"]
    assert not st.available and "simulated" in st.reason, st
    x = torch.randn(2, 5, 3)
    for _ in range(3):
        out = protdiff_fast.remove_center_of_mass(x)       # auto falls back to the reference
        assert abs(float(out.sum(1).abs().max())) < 1e-5
    assert backends.resolve("remove_center_of_mass", "auto", "cpu") == "reference"
    try:
        backends.resolve("remove_center_of_mass", "cpu", "cpu")
    except RuntimeError as err:
        assert "simulated" in str(err), err
    else:
        raise AssertionError("explicit cpu backend must fail without the extension")
    print("OK")
""")


def test_library_imports_without_the_extension_and_warns_once():
    proc = subprocess.run([sys.executable, "-c", MISSING_EXTENSION_SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"
    assert proc.stderr.count("CPU fast path unavailable") == 1, proc.stderr
    assert "simulated: no compiled extension" in proc.stderr


def test_cli_help_and_info(capsys):
    assert main([]) == 0
    assert "protdiff-fast" in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "egnn_pair_aggregate" in out and "auto on cpu" in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == protdiff_fast.__version__


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "protdiff_fast.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: protdiff-fast" in proc.stdout


def test_public_api():
    for name in protdiff_fast.__all__:
        assert hasattr(protdiff_fast, name), name
    s = protdiff_fast.NoiseSchedule()
    assert s.num_timesteps == 1000 and s.betas.dtype == torch.float64


def test_import_resolves_mkl_vml_dispatch_before_any_parallel_math():
    """pytorch/pytorch#188792: the first parallel call of a VML-backed op can return low-accuracy values
    on one thread's chunk (measured here: wrong first float64 sin in 11 of 200 fresh processes, 0 of 200
    after a one-element call; scripts/vml_race_storm.py). Importing protdiff_fast makes that call for
    every VML-backed op the library uses, in float32 and float64, once per process."""
    code = textwrap.dedent("""
        import torch, protdiff_fast, protdiff_fast._mkl_warmup as w
        print(w._done, torch.backends.mkl.is_available(), len(w.warm_up_vml()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    mkl = out[1] == "True"
    assert out[0] == ("True" if mkl else "False") and out[2] == "0", "runs at import, and only once"
    from protdiff_fast import _mkl_warmup

    used = {"sqrt", "exp", "log", "sin", "cos", "tanh", "sigmoid", "rsqrt", "erf", "expm1", "log1p"}
    assert used <= set(_mkl_warmup._VML_OPS) and all(hasattr(torch, name) for name in used)


def test_every_cli_option_has_help_and_its_default_shows():
    import argparse

    from protdiff_fast.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sp in commands.items() for a in sp._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, missing
    text = " ".join(commands["sample"].format_help().split())  # unwrapped
    assert "(default: 64..128)" in text and "(default: 0)" in text  # --length, --seed
    assert "(default 3.8)" in text and "(default: 3.8)" not in text  # named in the help: not twice
    assert "(default: False)" not in text  # flags say nothing
    assert "(default: metrics.png)" in " ".join(commands["evaluate"].format_help().split())


def test_cli_backend_that_cannot_run_here_is_named_up_front(tmp_path, capsys, monkeypatch):
    """--backend triton on the CPU (no interpreter): named before any work, not a RuntimeError at the
    first reverse step. (The tests run with TRITON_INTERPRET=1, under which triton runs on the CPU.)"""
    from protdiff_fast.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for cmd in (["sample", "--length", "10"], ["demo"]):
        assert main(cmd + ["--backend", "triton", "--out", str(tmp_path / "o")]) == 2
        assert "--backend triton: backend 'triton' cannot run egnn_pair_aggregate here" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_targets_and_quick_together_are_refused(capsys):
    from protdiff_fast.cli import main

    assert main(["bench", "--targets", "--quick", "--out", "/nonexistent/x"]) == 2
    assert "--targets runs the target rows as they are" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["sample", "--length", "5..3", "--out", "{tmp}/o"], "--length: empty range 5..3"),
    (["train", "--data", "x.npz", "--out", "{tmp}/t", "--coords-range", "2"], "--coords-range is the bound of --tanh"),
    (["demo", "--min-length", "90", "--max-length", "50", "--out", "{tmp}/d"], "need 1 <= min <= max"),
    (["evaluate", "{tmp}/bad.pdb", "--plot", ""], "no readable structures"),
    # named before any work (tracebacks, or errors at the first reverse step, before)
    (["sample", "--length", "0..10", "--out", "{tmp}/o"], "--length: lengths start at 1, got '0..10'"),
    (["sample", "--length", "10", "--device", "bogus", "--out", "{tmp}/o"], "--device: 'bogus' is not a device"),
    (["sample", "--length", "10", "--device", "mps", "--out", "{tmp}/o"], "runs on cpu and cuda devices"),
    (["info", "--device", "bogus"], "--device: 'bogus' is not a device"),
    (["demo", "--out", "{tmp}"], "the demo writes a new folder"),
    (["sample", "--length", "40", "--clash-distance", "3.0", "--out", "{tmp}/o"],
     "--clash-distance 3.0: only with --clash-guidance [STRENGTH], which is off"),
    (["demo", "--seed", "-1", "--out", "{tmp}/d"], "--seed: a non-negative integer, got -1"),  # (said: pass --resume or --overwrite)
    (["bench", "--device", "cuda:7", "--quick", "--out", "{tmp}/o"], "--device: 'cuda:7'"),
])
def test_cli_refusals_exit_2_with_a_message(tmp_path, capsys, argv, words):
    from protdiff_fast.cli import main

    (tmp_path / "bad.pdb").write_text("not a structure\n")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    captured = capsys.readouterr()
    assert words in captured.err + captured.out
    assert not (tmp_path / "o").exists() and not (tmp_path / "t").exists() and not (tmp_path / "d").exists()
