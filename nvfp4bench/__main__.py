"""``python -m nvfp4bench``: train and evaluate one cell (see nvfp4bench.train.cli)."""
import sys

from nvfp4bench.train.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
