from protdiff_fast.diffusion.schedule import SCHEDULES, NoiseSchedule
from protdiff_fast.diffusion.scheduler import DDPMScheduler, SchedulerOutput

__all__ = ["DDPMScheduler", "NoiseSchedule", "SCHEDULES", "SchedulerOutput"]
