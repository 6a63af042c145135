"""The Batch contract, without a model."""

import pytest

from dit_serve.contract import JobKind, JobRequest, OutputFormat
from worker.batching import Batch, JobTicket

SIZE = {"width": 32, "height": 32, "output_format": OutputFormat.PNG}


def _ticket(job_id: str, n: int = 1, steps: int = 25, seed: int = 10) -> JobTicket:
    request = JobRequest(
        kind=JobKind.IMAGE,
        model="m",
        n=n,
        seed=seed,
        class_labels=list(range(n)),
        guidance_scale=4.0,
        num_inference_steps=steps,
        **SIZE,
    )
    return JobTicket(job_id, "dit-serve.m", "exec", request)


def test_rows_follow_jobs_with_seed_plus_index() -> None:
    batch = Batch.from_tickets([_ticket("a", n=3, seed=100), _ticket("b")])
    assert len(batch) == 4
    assert [(row.job_id, row.index, row.seed, row.condition.class_label) for row in batch.rows] == [
        ("a", 0, 100, 0),
        ("a", 1, 101, 1),
        ("a", 2, 102, 2),
        ("b", 0, 10, 0),
    ]
    assert batch.row_indices("b") == [3]


def test_text_rows_carry_prompt_and_negative_prompt() -> None:
    request = JobRequest(
        kind=JobKind.IMAGE,
        model="p",
        n=2,
        seed=7,
        guidance_scale=4.5,
        num_inference_steps=20,
        prompt="a red fox",
        negative_prompt="blurry",
        **SIZE,
    )
    rows = JobTicket("t", "dit-serve.p", "exec", request).rows()
    conditions = {
        (row.condition.prompt, row.condition.negative_prompt, row.condition.class_label) for row in rows
    }
    assert conditions == {("a red fox", "blurry", None)} and [row.seed for row in rows] == [7, 8]


def test_incompatible_or_duplicate_jobs_cannot_join() -> None:
    batch = Batch.from_tickets([_ticket("a")])
    with pytest.raises(ValueError, match="cannot join"):
        batch.add(_ticket("b", steps=10))
    with pytest.raises(ValueError, match="already"):
        batch.add(_ticket("a"))
    with pytest.raises(ValueError, match="at least one"):
        Batch.from_tickets([])


def test_without_drops_a_jobs_rows_and_keeps_order() -> None:
    batch = Batch.from_tickets([_ticket("a", n=2), _ticket("b", n=2), _ticket("c")])
    rest = batch.without({"b"})
    assert list(rest.jobs) == ["a", "c"]
    assert [row.job_id for row in rest.rows] == ["a", "a", "c"]
    assert len(batch) == 5  # the original is unchanged
