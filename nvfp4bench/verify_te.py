"""``python -m nvfp4bench.verify_te``: see ``nvfp4bench.checks.verify_te``."""
import sys

from nvfp4bench.checks.verify_te import main

if __name__ == "__main__":
    sys.exit(main())
