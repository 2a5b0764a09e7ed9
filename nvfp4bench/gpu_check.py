"""``python -m nvfp4bench.gpu_check``: see ``nvfp4bench.checks.gpu_check``."""
import sys

from nvfp4bench.checks.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
