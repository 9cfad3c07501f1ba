"""The benchmark suite behind ``protdiff-fast bench`` (see :mod:`protdiff_fast.bench.runner`)."""
