"""Convert a raw brain-tumour MRI dataset into nvfp4bench's slice store (see nvfp4bench.data.prep).

    python data_prep.py --source {brats,msd,lgg,synthetic} --input RAW --output DATA_DIR ...
"""
import sys

from nvfp4bench.data.prep import main

if __name__ == "__main__":
    sys.exit(main())
