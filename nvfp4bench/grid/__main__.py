"""``python -m nvfp4bench.grid``: run a grid of cells (see ``cli``)."""
import sys

from nvfp4bench.grid.cli import main

if __name__ == "__main__":
    sys.exit(main())
