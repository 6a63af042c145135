"""The batch contract: which jobs and output rows share one denoising loop, and what they cost.

A batch is bounded in rows (DIT_MAX_BATCH) and in cost units (DIT_MAX_BATCH_COST). A row's cost is
what one output puts through the transformer at each step: pixels x frames x forward rows (2 with
classifier-free guidance, whose unconditional row shares the forward pass; 1 without). One 81-frame
480x832 Wan row with CFG costs 64.7 M units, as much as 31,590 rows of a 32x32 image with CFG (2,048
each): a cost limit sizes both batches right where a row limit cannot. The take script in
worker/queue.py computes the same cost in Lua.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

from dit_serve.caching import CachePolicy
from dit_serve.contract import JobKind, JobRequest
from dit_serve.loras import AppliedLora
from models.families.base import RowCondition
from worker.sampling import NO_GUIDANCE_AT_OR_BELOW

GUIDED_FORWARD_ROWS = 2  # a CFG row adds its unconditional row to the forward pass


def row_cost(request: JobRequest) -> int:
    """Cost units of one output row of this request: pixels x frames x forward rows."""
    forward_rows = GUIDED_FORWARD_ROWS if request.guidance_scale > NO_GUIDANCE_AT_OR_BELOW else 1
    return request.width * request.height * request.num_frames * forward_rows


@dataclass(frozen=True)
class Room:
    """How much more a batch may take: output rows and cost units."""

    rows: int
    cost: int

    def after(self, tickets: Iterable["JobTicket"]) -> "Room":
        """The room left once these jobs are in."""
        tickets = list(tickets)
        return Room(
            self.rows - sum(ticket.num_outputs for ticket in tickets),
            self.cost - sum(ticket.cost for ticket in tickets),
        )

    @property
    def full(self) -> bool:
        return self.rows <= 0 or self.cost <= 0


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

    @property
    def cost(self) -> int:
        """Cost units of all its rows (see row_cost)."""
        return self.request.n * row_cost(self.request)

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
                tuple(request.loras),
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
    loras: tuple[AppliedLora, ...] = ()  # LoRA adapters, mixed per row (worker/lora.py)


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
