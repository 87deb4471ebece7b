"""The options of a prediction: the ``predict`` config section (``perturbdiff predict``'s flags, the
pipeline's predict stage), under the name the prediction code uses, in a module of its own so that
the command line reads their defaults without importing torch."""

from __future__ import annotations

from .config import PredictConfig

PredictOptions = PredictConfig
