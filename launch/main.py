"""The main job on the embedded default: ``python launch/main.py [--config F] [key=value ...]``."""

import sys

from perturbdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
