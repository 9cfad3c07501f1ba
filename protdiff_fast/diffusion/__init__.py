from protdiff_fast.diffusion.schedule import SCHEDULES, NoiseSchedule

__all__ = ["NoiseSchedule", "SCHEDULES"]
