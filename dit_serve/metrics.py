"""Prometheus metric conventions shared by the API, the workers and the shipped dashboards and alerts.

Histogram buckets are sized to the work: HTTP answers in milliseconds (up to a 60 s long poll), one
denoising step or one stage of a batch from 1 ms to minutes, a whole job from 10 ms to a 30 min video.
"""

from dit_serve.jobs import LORA_UNAVAILABLE, SAMPLING_FAILED, STORAGE_FAILED

HTTP_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGE_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
JOB_SECONDS_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0,
)  # fmt: skip
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Where a worker serves its own /metrics (`--metrics-port`, DIT_METRICS_PORT; 0 turns it off).
DEFAULT_WORKER_METRICS_PORT = 9400

# Job outcomes as dit_jobs_finished_total's `status` label, and the error codes a worker fails jobs
# with; every combination is exported from the start (at 0), so dashboards and alerts see a series
# before the first failure.
FINISHED_STATUSES = ("completed", "failed", "canceled")
WORKER_ERROR_CODES = (SAMPLING_FAILED, STORAGE_FAILED, LORA_UNAVAILABLE)
