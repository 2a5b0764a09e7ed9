"""``python -m nvfp4bench.report RESULTS_DIR``: write the report (see ``cli``)."""
import sys

from nvfp4bench.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
