from protdiff_fast.diffusion.guidance import ClashGuidance
from protdiff_fast.diffusion.schedule import SCHEDULES, NoiseSchedule
from protdiff_fast.diffusion.guidance import ClashGuidance
from protdiff_fast.diffusion.scheduler import DDPMScheduler, SchedulerOutput

__all__ = ["ClashGuidance", "DDPMScheduler", "NoiseSchedule", "SCHEDULES", "SchedulerOutput"]
