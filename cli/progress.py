"""`dit-serve generate`'s progress display on stderr, driven by the job's events.

On a terminal it is one line redrawn in place; on a pipe or a file, one line per change, so logs and
tests read every step.
"""

from typing import TextIO

from dit_serve.client import JobBody, JobEnded, JobEvent, ProgressEvent, QueuedEvent, StartedEvent

BAR_WIDTH = 24


def _eta(eta_s: float | None) -> str:
    return f", eta {eta_s:.1f} s" if eta_s is not None else ""


def describe_job(job: JobBody) -> str:
    position = f", position {job.queue_position}" if job.queue_position is not None else ""
    return f"job {job.id} {job.status}{position}"


def describe(event: JobEvent) -> str | None:
    """The progress line for `event`; None for events the line does not show (previews)."""
    if isinstance(event, QueuedEvent):
        position = f"position {event.queue_position}" if event.queue_position is not None else "waiting"
        return f"queued: {position}{_eta(event.eta_s)}"
    if isinstance(event, StartedEvent):
        return "started"
    if isinstance(event, ProgressEvent):
        filled = BAR_WIDTH * event.step // max(event.steps, 1)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        return f"[{bar}] step {event.step}/{event.steps} {event.percent:3d}%{_eta(event.eta_s)}"
    if isinstance(event, JobEnded):
        return event.job.status
    return None


class ProgressLine:
    """Writes progress to `stream`: redrawn in place on a terminal, line by line elsewhere."""

    def __init__(self, stream: TextIO, enabled: bool = True):
        self._stream = stream
        self._enabled = enabled
        self._in_place = stream.isatty()
        self._width = 0  # of the line drawn last, to blank what a shorter one leaves

    def write(self, text: str | None) -> None:
        if not self._enabled or text is None:
            return
        if self._in_place:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        """End the line drawn in place, so what follows starts on its own line."""
        if self._enabled and self._in_place and self._width:
            self._stream.write("\n")
            self._stream.flush()
        self._width = 0
