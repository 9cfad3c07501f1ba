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
