"""Count wrong first calls of torch's CPU unary math in fresh processes, with and without protdiff_fast's
warm-up (protdiff_fast/_mkl_warmup.py; pytorch/pytorch#188792).

Each child process calls a few VML-backed ops (float32 and float64, large enough to be split over the
intra-op threads) twice on the same input and reports the ops whose first result differs from the
second (the second call is the accurate one). ``--import-protdiff`` imports protdiff_fast first, which
runs the warm-up.

    python scripts/vml_race_storm.py --processes 200 --parallel 2 --threads 2
    python scripts/vml_race_storm.py --processes 200 --parallel 2 --threads 2 --import-protdiff
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CHILD = r"""
import json, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
if sys.argv[2] == "1":
    import protdiff_fast  # noqa: F401  (runs the warm-up)
bad = []
for dtype in (torch.float64, torch.float32):
    x = torch.linspace(0.01, 3.0, 1 << 14, dtype=dtype)
    for name in ("sin", "cos", "exp", "log", "sqrt", "tanh"):
        fn = getattr(torch, name)
        first, second = fn(x), fn(x)
        if not torch.equal(first, second):
            rel = float(((first - second).abs() / second.abs().clamp(min=1e-30)).max())
            bad.append([name, str(dtype).replace("torch.", ""), rel])
print(json.dumps(bad))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=2, help="children at once (oversubscription makes the race likelier)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads per child")
    ap.add_argument("--import-protdiff", action="store_true", help="import protdiff_fast (its warm-up) first")
    args = ap.parse_args()

    def child(_):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), "1" if args.import_protdiff else "0"],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(child, range(args.processes)))
    per_op = collections.Counter((name, dtype) for bad in results for name, dtype, _ in bad)
    worst = max((rel for bad in results for _, _, rel in bad), default=0.0)
    report = dict(processes=args.processes, parallel=args.parallel, threads=args.threads,
                  import_protdiff=args.import_protdiff,
                  processes_with_a_wrong_first_call=sum(1 for bad in results if bad),
                  wrong_first_calls={f"{n} {d}": c for (n, d), c in sorted(per_op.items())},
                  worst_relative_error=worst)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
