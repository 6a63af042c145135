"""Interleaving: a long run pauses at a step boundary while a shorter batch of another model runs.

One worker serves several models' queues, one denoising loop at a time. Without interleaving, a
25-step video holds the worker for seconds, and every image that arrives meanwhile waits for all of
it: adding one video every 20 s to a steady image load raised the image p99 2.6-2.9x
(docs/benchmarks.md#mixed-workload). With it, a run stops after each step to look at the worker's
other queues: when one has jobs waiting and one batch of them is expected to end before this run
would, that batch runs now, to its end (static or continuous, as its model batches), and then this
run takes its next step. It is shortest-remaining-work-first at step granularity; a row's output does
not depend on the pause, since rows depend only on their own seed, condition and guidance.

Bounds:
- One level: a batch run inside a pause never pauses for another, and takes no more jobs once its
  first are in (a continuous one drains), so the paused run resumes as soon as they end.
- The paused run takes at least one step between two batches run inside it, so it never starves.
- Its jobs stay held and heartbeated; for the reapers they wait while the other batch samples, and
  the watchdog's ceiling starts again from their next step (worker/ledger.py).

Estimates come from this worker's own measured seconds per step of each queue (`Pace`). A queue that
has not run here yet is estimated from the running one's pace scaled by cost per step (pixels x
frames at the model's defaults), which is rough but orders a 32x32 image against a 16-frame video right.
"""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dit_serve.contract import JobRequest, ModelSpec

log = logging.getLogger(__name__)

PACE_WEIGHT = 0.5  # weight of the newest step time in a queue's moving average


@dataclass(frozen=True)
class QueueShape:
    """What one batch of a queue's model asks for by default: its steps, and its cost of one step."""

    steps: int
    step_cost: int  # pixels x frames of one row

    @classmethod
    def of(cls, spec: ModelSpec) -> "QueueShape":
        width, height = (int(side) for side in spec.default_size.split("x"))
        return cls(spec.defaults.num_inference_steps, width * height * (spec.defaults.num_frames or 1))


def step_cost(request: JobRequest) -> int:
    return request.width * request.height * request.num_frames


@dataclass
class Pace:
    """Seconds per denoising step of each queue on this worker, a moving average of measured steps."""

    seconds: dict[str, float] = field(default_factory=dict)

    def record(self, queue: str, step_s: float) -> None:
        old = self.seconds.get(queue)
        self.seconds[queue] = step_s if old is None else PACE_WEIGHT * step_s + (1 - PACE_WEIGHT) * old


def expected_batch_s(
    shape: QueueShape, known_s: float | None, running_step_s: float, running_step_cost: int
) -> float:
    """How long one batch of a waiting queue is expected to take: its steps at its own measured pace,
    or, never measured here, at the running run's pace scaled by cost per step."""
    if known_s is not None:
        return shape.steps * known_s
    return shape.steps * running_step_s * shape.step_cost / max(1, running_step_cost)


def shortest_to_interleave(
    waiting: Sequence[str], expected_s: dict[str, float], remaining_s: float
) -> str | None:
    """The waiting queue whose batch is expected to end first, if that is before the running run's end."""
    candidates = [queue for queue in waiting if expected_s[queue] < remaining_s]
    return min(candidates, key=lambda queue: expected_s[queue]) if candidates else None


# waiting(queues) -> those of `queues` with jobs queued
Waiting = Callable[[list[str]], list[str]]
# run_batch(queue) -> whether a batch of `queue` was taken and run to its end
RunBatch = Callable[[str], bool]


class Interleaver:
    """The worker's step-boundary hook: runs a shorter batch of another queue inside a long run."""

    def __init__(
        self, shapes: dict[str, QueueShape], waiting: Waiting, run_batch: RunBatch, enabled: bool = True
    ):
        self.shapes = shapes
        self.waiting = waiting
        self.run_batch = run_batch
        self.enabled = enabled and len(shapes) > 1
        self.pace = Pace()
        self.nested = False  # a batch runs inside a paused one
        self.paused_s = 0.0  # seconds spent in interleaved batches so far (timers leave them out)

    def turn(self, queue: str, request: JobRequest, remaining_steps: int, step_s: float | None) -> bool:
        """At a step boundary of a run of `queue` (its jobs like `request`, `remaining_steps` left,
        the last step having taken `step_s`): run one shorter batch of another queue, if one waits.
        Returns whether one ran (the caller then re-arms its watchdog and restarts its step clock)."""
        if step_s is not None:
            self.pace.record(queue, step_s)
        running_step_s = self.pace.seconds.get(queue)
        if not self.enabled or self.nested or remaining_steps <= 0 or running_step_s is None:
            return False
        others = self.waiting([name for name in self.shapes if name != queue])
        if not others:
            return False
        expected = {
            other: expected_batch_s(
                self.shapes[other], self.pace.seconds.get(other), running_step_s, step_cost(request)
            )
            for other in others
        }
        remaining_s = remaining_steps * running_step_s
        chosen = shortest_to_interleave(others, expected, remaining_s)
        if chosen is None:
            return False
        log.info(
            "pausing %s (%d steps, about %.1f s left) for a batch of %s (about %.1f s)",
            queue,
            remaining_steps,
            remaining_s,
            chosen,
            expected[chosen],
        )
        start = time.perf_counter()
        self.nested = True
        try:
            ran = self.run_batch(chosen)
        finally:
            self.nested = False
            self.paused_s += time.perf_counter() - start
        return ran

    def clock(self) -> float:
        """Seconds spent in interleaved batches so far: a paused run's timers leave them out."""
        return self.paused_s


def no_interleaving() -> Interleaver:
    """An Interleaver that never pauses a run (a worker of one model, or strategies run without one)."""
    return Interleaver({}, lambda _queues: [], lambda _queue: False, enabled=False)
