"""Prediction on several processes / GPUs: the sets are split over the ranks, rank 0 joins the parts.

    torchrun --nproc_per_node 8 launch/predict.py --checkpoint RUN/foundation --config RUN/config.yaml \
        --split test --n-samples 10 --out RUN/predict

Same arguments as ``perturbdiff predict`` (perturbdiff/cli.py); the output equals a one-process run.
"""

import sys

from perturbdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
