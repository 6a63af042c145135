"""The typed contract between the API and the workers: what a model accepts, and what a job asks for.

`ModelSpec` is the one description of a served model: its family adapter builds it, workers publish
it, `GET /v1/models` serves it as it is, and the API validates requests against it.

`JobRequest` is the one description of a job's work. The API builds it once (app/submission.py fills
every default from the model's `ModelSpec`), writes it to Redis once (as JSON in the job record), and
the worker parses it once into the same frozen type; nothing re-reads it by string key.

Adding a request field is a change in one place: a field that travels unchanged from the client's
body to the worker goes in `ClientOptions` (the API's request bodies and `JobRequest` both inherit
it); a field the API computes goes in `JobRequest`, beside the line of normalisation that fills it.

Every job carries `schema_version`. Bump `SCHEMA_VERSION` when a change would make an older worker
misread a job (a new field it must act on, a changed meaning); an older worker then leaves such jobs
in the queue for a newer one (see worker/queue.py) instead of running them wrongly.
"""

import json
from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dit_serve.caching import CachePolicy
from dit_serve.loras import AppliedLora, LoraInfo

# The newest job schema this code writes and understands. Bump it with every field a request gains:
# an older worker (its JobRequest forbids unknown fields) then leaves the new jobs queued for an
# upgraded worker instead of failing them as invalid_job. 1: the first contract; 2: `priority`
# (issue 15), `webhook_url` and `webhook_events` (issue 16); 3: `previews` (issue 17); 4: `cache`
# (issue 18); 5: `loras` (issue 19).
SCHEMA_VERSION = 5
MAX_QUEUE_TIMEOUT_S = 86_400
MAX_WEBHOOK_URL_CHARS = 2048
MAX_PREVIEW_EVERY = 1000  # previews: at most one every this many steps (more steps than any job has)


class JobKind(StrEnum):
    IMAGE = "image"
    VIDEO = "video"


class Priority(StrEnum):
    """A job's priority class: workers take high before normal before low (dit_serve/scheduling.py)."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for high: lower ranks go first."""
        return list(Priority).index(self)

    def capped(self, cap: "Priority") -> "Priority":
        """This priority, or `cap` when this one is higher."""
        return self if self.rank >= cap.rank else cap


class WebhookEvent(StrEnum):
    """What a job's webhook is sent for (README, "Webhooks")."""

    STARTED = "started"  # a worker started the job
    PROGRESS = "progress"  # its progress changed; at most one event every 500 ms
    COMPLETED = "completed"  # it ended: completed, failed or canceled (the payload's type says which)


class ConditioningKind(StrEnum):
    """How a model reads a request's condition."""

    CLASS = "class"  # prompts name labels of the checkpoint's id2label, or class_labels give ids
    TEXT = "text"  # free-text prompt and negative_prompt through a text encoder


class OutputFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"  # an image, or an animated WebP for videos
    MP4 = "mp4"
    GIF = "gif"


IMAGE_FORMATS = frozenset({OutputFormat.PNG, OutputFormat.JPEG, OutputFormat.WEBP})
VIDEO_FORMATS = frozenset({OutputFormat.MP4, OutputFormat.GIF, OutputFormat.WEBP})


class ModelDefaults(BaseModel):
    """The values a request gets for the fields it leaves out."""

    model_config = ConfigDict(frozen=True)

    num_inference_steps: int
    guidance_scale: float
    num_frames: int | None = None  # videos only


class ModelSpec(BaseModel):
    """What a client may ask of one model; built by the model's family adapter from its checkpoint."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: JobKind
    family: str
    conditioning: ConditioningKind
    sizes: list[str] = Field(description='"WxH" sizes always accepted; the first is the default')
    default_size: str
    size_multiple: int | None = Field(
        None, description="when set, any WxH with sides multiples of it (and at most max_pixels) is accepted"
    )
    max_pixels: int | None = None
    defaults: ModelDefaults
    labels: list[str] | None = Field(
        None, description="class models: the name(s) of each class id; null when the checkpoint has none"
    )
    num_classes: int | None = Field(None, description="class models: class_labels take ids 0..num_classes-1")
    max_frames: int | None = None
    frames_multiple: int = Field(1, description="num_frames - 1 must be a multiple of this")
    cache_policies: list[str] = Field(
        default_factory=list, description="the step-caching policies a request's `cache` may name"
    )
    cache_auto: CachePolicy | None = Field(
        None,
        description='what cache: "auto" runs: the policy measured on this model to keep its quality '
        "(`dit-serve eval --cache`); null: auto means no caching",
    )
    loras: list[LoraInfo] = Field(
        default_factory=list,
        description="the LoRA adapters a request's `loras` may name (registered with --lora or "
        "POST /v1/loras)",
    )


class ClientOptions(BaseModel):
    """Request fields that travel unchanged from the client's body to the worker.

    The API's request bodies (dit_serve/schemas.py) and `JobRequest` both inherit these fields, and the API's
    normalisation copies them across, so a field added here is accepted, validated, stored and
    readable as `ticket.request.<field>` in the worker with no other change.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_timeout_s: int | None = Field(
        None,
        ge=1,
        le=MAX_QUEUE_TIMEOUT_S,
        description="a job not started within this many seconds of its acceptance fails with "
        "queue_timeout and never starts later; default: no limit",
    )
    priority: Priority = Field(
        Priority.NORMAL,
        description="high jobs are taken before normal, normal before low (a low job waiting longer "
        "than the server's priority aging time counts as normal); capped by the API key's "
        "max_priority, and the job shows the priority it got",
    )
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_WEBHOOK_URL_CHARS,
        description="an https URL that is sent the job's events as signed POSTs (Standard Webhooks); "
        "private, loopback and link-local addresses are refused unless the operator allows them",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        max_length=len(WebhookEvent),
        description="the events to send (needs webhook_url): started, progress (at most every 500 ms), "
        "completed (the end, however the job ended); default: completed",
    )

    previews: int | None = Field(
        None,
        ge=1,
        le=MAX_PREVIEW_EVERY,
        description="send a preview event (a small PNG per output, decoded cheaply from the predicted "
        "clean latent) every this many denoising steps on GET /v1/jobs/{id}/events; default: none",
    )

    @model_validator(mode="after")
    def _webhook_events_need_a_url(self) -> Self:
        if self.webhook_events is not None:
            if self.webhook_url is None:
                raise ValueError("webhook_events needs a webhook_url to send them to")
            if len(set(self.webhook_events)) != len(self.webhook_events):
                raise ValueError("webhook_events lists an event twice")
        return self


class JobRequest(ClientOptions):
    """A job's request with every default filled in and its seed chosen: exactly what a worker runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    kind: JobKind
    model: str
    prompt: str | None = None  # text models: the prompt; class models: the label it named, if any
    negative_prompt: str | None = None  # text models only ("" when not given)
    class_labels: list[int] | None = None  # class models only: one id per output
    n: int = Field(ge=1)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    num_inference_steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)
    seed: int = Field(ge=0, description="output k uses seed + k")
    output_format: OutputFormat
    num_frames: int = Field(1, ge=1)  # 1 for images
    cache: CachePolicy | None = None  # step caching, resolved by the API; None: every step runs
    loras: list[AppliedLora] = []  # LoRA adapters, resolved by the API from the registry
    fps: int | None = None  # videos only

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.class_labels is None) == (self.negative_prompt is None):
            raise ValueError("a job has class_labels (class models) or a negative_prompt (text models)")
        if self.class_labels is not None and len(self.class_labels) != self.n:
            raise ValueError(f"class_labels has {len(self.class_labels)} ids for n = {self.n} outputs")
        formats = IMAGE_FORMATS if self.kind is JobKind.IMAGE else VIDEO_FORMATS
        if self.output_format not in formats:
            raise ValueError(f"output_format {self.output_format} is not a {self.kind} format")
        return self

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def compat(self) -> str:
        """Jobs with equal keys may share one batched denoising loop: same model, size, steps, frames."""
        return f"{self.model}|{self.kind}|{self.size}|{self.num_inference_steps}|{self.num_frames}"

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, data: str | bytes) -> "JobRequest":
        """Parse a stored request; JobTooNewError when a newer dit-serve wrote it, JobSchemaError when
        it is damaged (does not fit the schema it names)."""
        try:
            version = int(json.loads(data).get("schema_version", SCHEMA_VERSION))
        except (ValueError, TypeError, AttributeError) as exc:
            raise JobSchemaError(f"the stored request is not a JSON object: {exc}") from exc
        if version > SCHEMA_VERSION:
            raise JobTooNewError(too_new(version))
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise JobSchemaError(f"the stored request does not fit job schema v{version}: {exc}") from exc


class JobSchemaError(ValueError):
    """A stored job this code cannot read: damaged, or (JobTooNewError) written by a newer dit-serve."""


class JobTooNewError(JobSchemaError):
    """A stored job written with a newer job schema than this code understands."""


def too_new(version: int) -> str:
    return (
        f"the job was written with job schema v{version}, and this process understands up to "
        f"v{SCHEMA_VERSION}; upgrade it to the API's dit-serve version"
    )
