import sys

from protdiff_fast.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
