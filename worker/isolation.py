"""Poison isolation: when a batch's sampling raises, which smaller batches to try its jobs in.

Only a job that fails alone is failed (`sampling_failed`); the jobs that shared a batch with it are
run again, one by one, in the same worker. A device out-of-memory error says the batch was too large
rather than that a job is bad, so such a batch is first halved, and each half tried again
(recursively), before its jobs are tried one by one.
"""

import torch

from worker.batching import JobTicket

OUT_OF_MEMORY_TEXT = "out of memory"  # how torch's CUDA (and other backends') allocators say it


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or a RuntimeError whose text says "out of memory"."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and OUT_OF_MEMORY_TEXT in str(exc).lower()
    )


def halves(tickets: list[JobTicket]) -> list[list[JobTicket]]:
    """Two groups of jobs with about half the outputs each, in order (a job's outputs stay together)."""
    total = sum(ticket.num_outputs for ticket in tickets)
    first: list[JobTicket] = []
    outputs = 0
    for ticket in tickets[:-1]:
        if first and outputs + ticket.num_outputs > total / 2:
            break
        first.append(ticket)
        outputs += ticket.num_outputs
    return [first, tickets[len(first) :]]


def retry_groups(tickets: list[JobTicket], exc: BaseException) -> list[list[JobTicket]]:
    """How to try again the jobs (two or more) of a batch whose sampling raised `exc`."""
    if is_out_of_memory(exc) and len(tickets) > 2:
        return halves(tickets)
    return [[ticket] for ticket in tickets]


def free_device_memory(exc: BaseException) -> None:
    """After an out-of-memory error, hand the failed batch's cached blocks back before trying again."""
    if is_out_of_memory(exc) and torch.cuda.is_available():
        torch.cuda.empty_cache()
