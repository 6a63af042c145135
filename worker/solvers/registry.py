"""Which row solver steps a model's scheduler: one table, by scheduler class."""

from collections.abc import Callable

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from worker.solvers.base import RowSolver, UnsupportedScheduler
from worker.solvers.ddim import DDIMSolver
from worker.solvers.dpm import DPMSolver
from worker.solvers.unipc import UniPCSolver

# Exact classes, not subclasses: a subclass may change the update.
ROW_SOLVERS: dict[type[SchedulerMixin], Callable[[SchedulerMixin, int], RowSolver]] = {
    DDIMScheduler: DDIMSolver,
    DPMSolverMultistepScheduler: DPMSolver,
    UniPCMultistepScheduler: UniPCSolver,
}


def row_solver(scheduler: SchedulerMixin, num_inference_steps: int) -> RowSolver:
    """The per-row step for `scheduler`'s schedule of `num_inference_steps`.

    Raises:
        UnsupportedScheduler: the scheduler, or one of its options, has no per-row step here.
    """
    build = ROW_SOLVERS.get(type(scheduler))
    if build is None:
        supported = ", ".join(cls.__name__ for cls in ROW_SOLVERS)
        raise UnsupportedScheduler(
            f"{type(scheduler).__name__} has no per-row step for continuous batching (these have: "
            f"{supported}); its model batches statically"
        )
    return build(scheduler, num_inference_steps)
