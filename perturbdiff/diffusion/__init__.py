"""The diffusion process around the network: schedules, the training objective, the sampler.

The network (perturbdiff/models) predicts x0 for a noisy set; everything about noise, timesteps,
guidance and losses lives here.
"""

from .objective import LossTerms, SetDiffusion, covariates_from_batch
from .sampler import sample_sets
from .schedule import NoiseSchedule, respaced_timesteps

__all__ = ["LossTerms", "NoiseSchedule", "SetDiffusion", "covariates_from_batch", "respaced_timesteps",
           "sample_sets"]
