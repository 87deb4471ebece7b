"""PerturbDiff: set-level diffusion over single-cell populations.

Importing the package has no side effects (no CUDA, no process group, no heavy imports).
"""

__version__ = "0.1.0"
