"""``python -m nvfp4bench.bench``: see ``nvfp4bench.checks.bench``."""
import sys

from nvfp4bench.checks.bench import main

if __name__ == "__main__":
    sys.exit(main())
