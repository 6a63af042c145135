"""What a batching strategy is: it runs the jobs a worker took from one queue to their end."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from models.loading import LoadedModel
from worker.batching import JobTicket


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int  # most output rows sampled together
    max_wait_ms: int  # static batching: how long the first job waits for compatible ones


# yield_turn(queue) -> True when the worker is stopping or another of its queues has jobs waiting:
# a strategy then takes no more jobs from `queue`.
YieldTurn = Callable[[str], bool]


class BatchStrategy(Protocol):
    def run(self, queue: str, model: LoadedModel, tickets: list[JobTicket]) -> None:
        """Run `tickets` (taken and held through the ledger) and any jobs taken beside them to their end.

        Every job the run holds is settled (completed, failed or canceled) or released when it returns.
        """
