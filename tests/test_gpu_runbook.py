"""benchmarks/gpu.sh, the script a lent GPU machine runs, exercised here with stand-ins for python3 and
nvidia-smi: each stage must run from a bare checkout, pass its arguments through, stop at its time limit
keeping what it measured, and pack everything into the one archive the device tool brings back."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                                reason="needs bash and tar")

FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$@" >> "$FAKE_LOG"
case "$*" in
  *gpu_check_sampler.py*) echo "fake sampler check line"; exit "${FAKE_SAMPLER_RC:-0}" ;;
  *gpu_check.py*) echo "fake check line"; [ -n "${FAKE_CHECK_SLEEP:-}" ] && exec sleep "$FAKE_CHECK_SLEEP"
    exit "${FAKE_RC:-0}" ;;
  *gpu_profile_bwd.py*)
    out=""; prev=""
    for a in "$@"; do [ "$prev" = "--out" ] && out="$a"; prev="$a"; done
    mkdir -p "$(dirname "$out")"; echo '{"results": []}' > "$out"; echo "fake bwd table"; exit 0 ;;
  -c*) echo "torch fake cuda fake triton fake" ;;
  *protdiff_fast.cli*)
    out=""; prev=""
    for a in "$@"; do [ "$prev" = "--out" ] && out="$a"; prev="$a"; done
    mkdir -p "$out"; echo '{"rows": []}' > "$out/results.json"
    [ -n "${FAKE_SLEEP:-}" ] && exec sleep "$FAKE_SLEEP"
    exit "${FAKE_RC:-0}" ;;
esac
"""


def _run(tmp_path, stage, *extra, env_extra=None, script=ROOT / "benchmarks" / "gpu.sh"):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name, text in (("python3", FAKE_PYTHON), ("nvidia-smi", "#!/usr/bin/env bash\necho 'name, driver'\n")):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", OUT=str(out), FAKE_LOG=str(tmp_path / "calls"),
               **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(script), stage, *extra], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    archives = sorted(out.glob("*.tgz"))
    members = {}
    if archives:
        with tarfile.open(archives[0]) as tar:
            members = {m.name.split("/", 1)[-1]: tar.extractfile(m).read().decode() for m in tar.getmembers()
                       if m.isfile()}
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    return proc, archives, members, calls


def test_check_stage_packs_one_archive_and_keeps_the_exit_status(tmp_path):
    proc, archives, members, calls = _run(tmp_path, "check", env_extra=dict(FAKE_RC="3"))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert len(archives) == 1 and archives[0].name.startswith("gpu-check-")
    assert "fake check line" in members["gpu_check.txt"]
    assert members["commit.txt"].strip() and "name, driver" in members["gpu.txt"]
    assert "benchmarks/gpu_check.py --jobs 13" in calls


def test_check_stage_runs_the_sampler_check_too_and_fails_with_it(tmp_path):
    proc, archives, members, calls = _run(tmp_path, "check", env_extra=dict(FAKE_SAMPLER_RC="1", CHECK_JOBS="4"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "fake sampler check line" in members["gpu_check_sampler.txt"]
    assert "fake check line" in proc.stdout and "fake sampler check line" in proc.stdout
    assert "gpu_check.py --jobs 4" in calls and "benchmarks/gpu_check_sampler.py" in calls


def test_lease_stage_checks_then_times_the_targets_and_keeps_a_check_failure(tmp_path):
    proc, archives, members, calls = _run(tmp_path, "lease", "--providers", "triton",
                                          env_extra=dict(FAKE_SAMPLER_RC="1"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(archives) == 1 and archives[0].name.startswith("gpu-lease-")
    assert {"gpu_check.txt", "gpu_check_sampler.txt", "targets/results.json"} <= set(members)
    order = [c for c in calls.splitlines() if "gpu_check" in c or "protdiff_fast.cli" in c]
    assert "protdiff_fast.cli" in order[-1] and "--warm-jobs 13" in order[-1] and order[-1].endswith("--providers triton")


def test_targets_stage_runs_the_cli_from_the_checkout_with_the_extra_arguments(tmp_path):
    proc, archives, members, calls = _run(tmp_path, "targets", "--providers", "triton")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "targets/results.json" in members
    line = next(c for c in calls.splitlines() if "protdiff_fast.cli" in c)
    assert "bench all --targets --device cuda" in line and line.endswith("--providers triton")


def test_a_stage_stops_at_its_time_limit_and_keeps_its_results(tmp_path):
    proc, archives, members, _ = _run(tmp_path, "grid", "--hidden", "128",
                                      env_extra=dict(STAGE_TIMEOUT="1", FAKE_SLEEP="20"))
    assert proc.returncode == 124
    assert "grid/results.json" in members and "stopped at 1 s" in members["gpu.txt"]


def test_lease_keeps_to_its_stage_limit_when_the_checks_use_it_all(tmp_path):
    """CHECK_TIMEOUT above what the stage has (STAGE_TIMEOUT=3 here, CHECK_TIMEOUT 10): the checks ran their
    10 s, past the stage's limit, and the targets then got `timeout <= 0` - refused when negative, and when
    exactly 0 no limit at all, so the device call was killed before the archive was packed. Now the checks
    are bounded by the stage, the targets get at least 1 s, and the archive comes back."""
    import time

    t0 = time.monotonic()
    proc, archives, members, calls = _run(tmp_path, "lease", env_extra=dict(
        STAGE_TIMEOUT="3", CHECK_TIMEOUT="10", FAKE_CHECK_SLEEP="30", FAKE_SLEEP="30"))
    elapsed = time.monotonic() - t0
    assert elapsed < 8, (elapsed, proc.stdout + proc.stderr)
    assert "protdiff_fast.cli" in calls, proc.stdout + proc.stderr  # the targets were started, and stopped
    assert len(archives) == 1 and "targets/results.json" in members and "stopped at 3 s" in members["gpu.txt"]


def test_the_commit_recorded_is_gpu_commit_before_git(tmp_path):
    """The device machine's .git can hold an older commit than the tree it was sent (seen 2026-12-04)."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu.sh", repo / "benchmarks" / "gpu.sh")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "older"], check=True)
    (repo / ".gpu-commit").write_text("cafe123\n")
    proc, archives, members, _ = _run(tmp_path, "check", script=repo / "benchmarks" / "gpu.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert members["commit.txt"].strip() == "cafe123"


def test_bwd_stage_runs_the_profile_script_and_keeps_its_table(tmp_path):
    proc, archives, members, calls = _run(tmp_path, "bwd", "--only", "sweep")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fake bwd table" in members["bwd.log"] and "bwd/results.json" in members
    assert "benchmarks/gpu_profile_bwd.py --jobs 13" in calls and calls.strip().endswith("--only sweep")


def test_unknown_stage_is_refused(tmp_path):
    proc, archives, _, _ = _run(tmp_path, "everything")
    assert proc.returncode == 2 and "unknown stage" in proc.stderr


def test_gpu_check_scripts_run_their_comparisons_on_the_cpu():
    """The device checks themselves (not stand-ins), on CPU tensors at small sizes: the Triton kernels
    under the interpreter for gpu_check.py, the C++ backend for gpu_check_sampler.py (no graphs here, so
    its two capture checks must say FAIL: that they report instead of crashing is what is tested)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    egnn = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--jobs", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert egnn.returncode == 0 and "0 failed" in egnn.stdout, egnn.stdout[-2000:] + egnn.stderr[-2000:]
    # 8 combinations (H <= 32, clamp included; rectangular (66, 16, 64)) x 2 sizes
    assert egnn.stdout.count("ok  ") == 16 and egnn.stdout.count("H=66x16x64") == 4
    steps = subprocess.run([sys.executable, "benchmarks/gpu_check_sampler.py", "--device", "cpu", "--backend", "cpu",
                            "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = steps.stdout.splitlines()
    assert sum(ln.startswith("ok   ddpm step") for ln in lines) == 8, steps.stdout[-2000:] + steps.stderr[-2000:]
    assert any(ln.startswith("ok   in-kernel noise") for ln in lines)
    assert sum(ln.startswith("FAIL DenoiseStep") and "captured False" in ln for ln in lines) == 2
    assert sum(ln.startswith("ok   sample()") for ln in lines) == 2 and steps.returncode == 1
