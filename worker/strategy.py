"""What a batching strategy is: it runs the jobs a worker took from one queue to their end."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from models.loading import LoadedModel
from worker.batching import JobTicket, Room


@dataclass(frozen=True)
class BatchLimits:
    """How large a batch may grow, and how long static batching keeps one open (worker/fill_window.py)."""

    max_batch: int  # most output rows sampled together
    max_cost: int  # most cost units sampled together (worker/batching.py)
    max_wait_ms: int = 0  # static batching: how long a lone first job waits for compatible ones
    gap_ms: int = 0  # ... how long each job that joins keeps the window open
    max_fill_ms: int = 0  # ... the longest the window stays open after the first job

    @property
    def room(self) -> Room:
        return Room(self.max_batch, self.max_cost)


# yield_turn(queue) -> True when the worker is stopping or another of its queues has jobs waiting:
# a strategy then takes no more jobs from `queue`.
YieldTurn = Callable[[str], bool]


class BatchStrategy(Protocol):
    def run(self, queue: str, model: LoadedModel, tickets: list[JobTicket]) -> None:
        """Run `tickets` (taken and held through the ledger) and any jobs taken beside them to their end.

        Every job the run holds is settled (completed, failed or canceled) or released when it returns.
        """
