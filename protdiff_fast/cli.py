"""The ``protdiff-fast`` command line."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import protdiff_fast
    from protdiff_fast import backends

    print(f"protdiff_fast {protdiff_fast.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    ext = backends.cpu_extension()
    if ext is not None:
        print(f"C++ extension: {ext.compiler}, {ext.build_type}, OpenMP {'on' if ext.has_openmp else 'off'} "
              f"({ext.max_threads()} threads), -march=native {'on' if ext.native_arch else 'off'}")
    print(backends.describe(args.device))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from protdiff_fast.bench import runner

    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    suites = ["egnn", "ddpm-step"] if args.suite == "all" else [args.suite]
    command = "protdiff-fast " + " ".join(sys.argv[1:]) if sys.argv and "protdiff" in sys.argv[0] else \
        "protdiff-fast bench " + " ".join(a for a in (args.suite, "--quick" if args.quick else "") if a)
    result = runner.run(suites, device, args.quick, args.out, args.timeout, args.compare, command,
                        providers=args.providers.split(",") if args.providers else None,
                        which="targets" if args.targets else "full")
    print(f"wrote {args.out}/results.json, {args.out}/results.md" +
          (f" and {len(result['plots'])} plots" if result["plots"] else " (no plots: none for this suite, or matplotlib missing)"))
    return 0


def _metric_rows(paths, clash_threshold):
    from protdiff_fast.io import StructureError, find_structure_files, read_backbones
    from protdiff_fast.metrics import backbone_metrics

    rows, cas, skipped = [], [], []
    for f in find_structure_files(paths):
        try:
            for bb in read_backbones(f):
                rows.append(backbone_metrics(bb.ca, clash_threshold))
                cas.append(bb.ca)
        except StructureError as err:
            skipped.append(str(err))
    return rows, cas, skipped


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from protdiff_fast.metrics import format_table, plot_metrics, summarize, tm_diversity

    sets = {"samples": args.paths}
    if args.reference:
        sets["reference"] = args.reference
    columns, all_rows = {}, {}
    for name, paths in sets.items():
        rows, cas, skipped = _metric_rows(paths, args.clash_threshold)
        for msg in skipped:
            print(f"skipped: {msg}")
        if not rows:
            print(f"error: no readable structures in {name} ({', '.join(map(str, paths))})")
            return 2
        columns[name] = summarize(rows)
        if args.tm:
            columns[name]["tm_diversity"] = tm_diversity(cas)
        all_rows[name] = rows
    print(f"clash: non-adjacent CA pairs closer than {args.clash_threshold} A; CA-CA ideal 3.80 A; "
          "rg_ratio: Rg / (2.2 N^0.38 A)")
    print(format_table(columns))
    if args.plot:
        written = plot_metrics(all_rows, args.plot)
        print(f"plot: {written}" if written else "no plot: matplotlib is not installed (pip install matplotlib)")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from protdiff_fast.io import BackboneDataset

    ds = BackboneDataset.from_structures(args.paths, min_length=args.min_length, max_length=args.max_length,
                                         monomers_only=not args.all_chains, max_breaks=args.max_breaks,
                                         cache=args.out)
    lengths = ds.lengths
    print(f"{len(ds)} chains" + (f", lengths {lengths.min()}..{lengths.max()}" if len(ds) else "") +
          f" -> {args.out}" + (" (cache was up to date)" if ds.cache_hit else ""))
    print(ds.skipped)
    for what, reason in ds.skipped.skipped[: args.show_skipped]:
        print(f"  {what}: {reason}")
    return 0 if len(ds) else 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protdiff-fast",
        description="Kernel-accelerated ProtDiff: diffusion over protein C-alpha backbones with a fused EGNN.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, the C++ build, and which backend 'auto' picks per op")
    info.add_argument("--device", default=None, help="device to resolve 'auto' for (default: cuda if present, else cpu)")
    info.set_defaults(func=_cmd_info)
    prep = sub.add_parser("prepare", help="turn PDB/mmCIF files into a cached training set (.npz), reporting skips")
    prep.add_argument("paths", nargs="+", help="files or folders (searched recursively; .pdb/.cif/.ent, also .gz)")
    prep.add_argument("--out", required=True, help="the dataset cache (.npz); reused while inputs and filter match")
    prep.add_argument("--min-length", type=int, default=40)
    prep.add_argument("--max-length", type=int, default=128)
    prep.add_argument("--all-chains", action="store_true", help="every protein chain, not only single-chain files")
    prep.add_argument("--max-breaks", type=int, default=None, help="drop chains with more CA-CA gaps > 4.2 A")
    prep.add_argument("--show-skipped", type=int, default=20, help="list this many skipped entries")
    prep.set_defaults(func=_cmd_prepare)
    ev = sub.add_parser("evaluate", help="backbone quality metrics of structures, side by side with a reference set")
    ev.add_argument("paths", nargs="+", help="PDB/mmCIF files or folders (searched recursively)")
    ev.add_argument("--reference", nargs="+", default=None, help="real structures to compare with")
    ev.add_argument("--plot", default="metrics.png", help="where to write the histogram plot ('' for none)")
    ev.add_argument("--clash-threshold", type=float, default=3.0, help="CA-CA clash distance in A (default 3.0)")
    ev.add_argument("--tm", action="store_true", help="mean pairwise TM-score per set (needs tmtools)")
    ev.set_defaults(func=_cmd_evaluate)
    bench = sub.add_parser("bench", help="benchmark suites: time, peak memory, FLOP/s against this device's own limits")
    bench.add_argument("suite", nargs="?", default="egnn", choices=["egnn", "ddpm-step", "all"],
                       help="which suite (the sampler and train-step suites come with those features)")
    bench.add_argument("--targets", action="store_true",
                       help="only the rows the kernel issues set targets on (B=4 N=256, N=1024, N=4096, the step)")
    bench.add_argument("--quick", action="store_true", help="a small grid that runs in about a minute")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--out", default="bench-results", help="output folder for results.json / results.md / plots")
    bench.add_argument("--timeout", type=float, default=300.0, help="seconds per row before it is recorded as timeout")
    bench.add_argument("--providers", default=None, help="comma-separated subset: reference,cpu,triton,egnn-pytorch")
    bench.add_argument("--compare", default=None, metavar="OLD.json", help="print the change against an earlier results.json")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from protdiff_fast import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
