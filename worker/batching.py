"""The batch contract: which jobs and output rows share one denoising loop."""

from collections.abc import Iterable
from dataclasses import dataclass, field

from dit_serve.caching import CachePolicy
from dit_serve.contract import JobKind, JobRequest
from models.families.base import RowCondition


@dataclass(frozen=True)
class JobHandle:
    """Which job a worker holds, and under which execution: all that settling a job needs."""

    job_id: str
    queue: str
    execution: str


@dataclass(frozen=True)
class JobTicket(JobHandle):
    """A job a worker holds, with its request parsed from the contract."""

    request: JobRequest
    created_at: float = 0.0  # unix time the API accepted the job (0: unknown)
    solo: bool = False  # taken alone, and nothing joins it (dit_serve/reaping.py says when)

    @property
    def compat(self) -> str:
        return self.request.compat

    @property
    def kind(self) -> JobKind:
        return self.request.kind

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def num_outputs(self) -> int:
        return self.request.n

    def rows(self) -> list["SampleRow"]:
        """Output k uses seed + k, and class_labels[k] (class models) or the prompts (text models)."""
        request = self.request
        labels = request.class_labels
        return [
            SampleRow(
                self.job_id,
                k,
                request.seed + k,
                RowCondition(
                    class_label=labels[k] if labels else None,
                    prompt=None if labels else request.prompt,
                    negative_prompt=request.negative_prompt or "",
                ),
                request.guidance_scale,
                request.cache,
            )
            for k in range(request.n)
        ]


@dataclass(frozen=True)
class SampleRow:
    """One output being generated: one row of the latent batch."""

    job_id: str
    index: int
    seed: int
    condition: RowCondition
    guidance_scale: float
    cache: CachePolicy | None = None  # step caching, decided per row (worker/step_cache.py)


@dataclass
class Batch:
    """Compatible jobs (same model, size, steps, frames) sampled together; one row per output."""

    compat: str
    jobs: dict[str, JobTicket] = field(default_factory=dict)
    rows: list[SampleRow] = field(default_factory=list)

    @classmethod
    def from_tickets(cls, tickets: Iterable[JobTicket]) -> "Batch":
        tickets = list(tickets)
        if not tickets:
            raise ValueError("a batch needs at least one job")
        batch = cls(compat=tickets[0].compat)
        for ticket in tickets:
            batch.add(ticket)
        return batch

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, ticket: JobTicket) -> None:
        """Add a joining job's rows; it must be compatible and not already in the batch."""
        if ticket.compat != self.compat:
            raise ValueError(f"job {ticket.job_id} ({ticket.compat}) cannot join a batch of {self.compat}")
        if ticket.job_id in self.jobs:
            raise ValueError(f"job {ticket.job_id} is already in the batch")
        self.jobs[ticket.job_id] = ticket
        self.rows.extend(ticket.rows())

    def without(self, job_ids: set[str]) -> "Batch":
        """The batch minus finished or canceled jobs, rows in the same order."""
        return Batch(
            compat=self.compat,
            jobs={job_id: ticket for job_id, ticket in self.jobs.items() if job_id not in job_ids},
            rows=[row for row in self.rows if row.job_id not in job_ids],
        )

    def row_indices(self, job_id: str) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row.job_id == job_id]

    @property
    def first(self) -> JobTicket:
        return next(iter(self.jobs.values()))
