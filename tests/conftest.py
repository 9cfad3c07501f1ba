import os

# Triton reads this when @triton.jit runs: it must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (README's test command runs one worker per core) each worker and the scripts it
# starts get one thread unless OMP_NUM_THREADS says otherwise: with a thread pool per core in each
# worker the cores are oversubscribed (2-core Xeon, `pytest -q -n 2`: 1105 s, against 653 s with this).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
