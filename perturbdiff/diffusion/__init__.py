"""The diffusion process around the network: schedules, the training objective, the sampler.

The network (perturbdiff/models) predicts x0 for a noisy set; everything about noise, timesteps,
guidance and losses lives here.
"""

from .objective import LossTerms, SetDiffusion
from .sampler import bridge_sets, invert_sets, sample_sets
from .schedule import NoiseSchedule, respaced_timesteps

__all__ = ["LossTerms", "NoiseSchedule", "SetDiffusion", "bridge_sets", "invert_sets",
           "respaced_timesteps", "sample_sets"]
