"""Request and response bodies of the v1 API (diffusers' parameter names).

They live in the core, not in app/, because two sides speak them: the API validates and answers with
them, and the Python client (dit_serve/client/) builds its requests and parses its answers with the
same types, without importing the web stack.

Request bodies inherit `ClientOptions` from the job contract (dit_serve/contract.py): fields that travel
unchanged to the worker are declared there once. Model descriptions are the contract's `ModelSpec`.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from dit_serve.caching import CachePolicy
from dit_serve.contract import ClientOptions, JobRequest, ModelSpec
from dit_serve.jobs import JobError
from dit_serve.loras import MAX_LORAS_PER_REQUEST, NAME_PATTERN, LoraInfo, LoraRef, check_lora_list
from dit_serve.webhooks import WebhookDelivery

MAX_OUTPUTS = 8
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_SEED = 2**63 - 1
MAX_FPS = 60
DEFAULT_FPS = 8
SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"


MODEL_DEFAULT = "default: the model's `defaults` (GET /v1/models)"


# _one_condition below, for /openapi.json: a request carries a prompt or class_labels, not both.
ONE_CONDITION: list[JsonValue] = [
    {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    {"required": ["class_labels"], "properties": {"class_labels": {"type": "array"}}},
]


class GenerationRequest(ClientOptions):
    """Fields shared by image and video requests; unknown fields are rejected."""

    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), json_schema_extra={"oneOf": ONE_CONDITION}
    )

    model: str | None = Field(None, min_length=1, max_length=200, description="default: the default model")
    prompt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="text models: the prompt; class models: a label name (or give class_labels)",
    )
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description='text models only; default ""'
    )
    class_labels: list[int] | None = Field(
        None,
        min_length=1,
        max_length=MAX_OUTPUTS,
        description="class models: class ids, one for all outputs or one per output",
    )
    size: str | None = Field(
        None, pattern=SIZE_PATTERN, description='"WxH"; default: the model\'s `default_size`'
    )
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description=MODEL_DEFAULT)
    guidance_scale: float | None = Field(
        None, ge=0.0, le=MAX_GUIDANCE, description=f"{MODEL_DEFAULT}; <= 1: no CFG"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: random; output k uses seed + k")
    cache: Literal["none", "auto", "first_block", "interval"] | CachePolicy | None = Field(
        None,
        description='step caching: "none"; "auto", the policy measured for the model (its `cache_auto`); '
        "a policy name with its default knobs; or a policy object with knobs. Faster, at a small "
        "measured cost in fidelity (docs/benchmarks.md). Default: the server's default for the model, "
        "which is none unless the operator set one",
    )

    loras: list[LoraRef] | None = Field(
        None,
        max_length=MAX_LORAS_PER_REQUEST,
        description="LoRA adapters of the model to apply (GET /v1/models: `loras`), each with a scale 0-2; "
        "rows with different adapters share a batch. Default: none",
    )

    @model_validator(mode="after")
    def _one_condition(self) -> "GenerationRequest":
        if (self.prompt is None) == (self.class_labels is None):
            raise ValueError("give exactly one of prompt or class_labels")
        check_lora_list(self.loras or [])
        return self


class ImageRequest(GenerationRequest):
    n: int = Field(1, ge=1, le=MAX_OUTPUTS)
    output_format: Literal["png", "jpeg", "webp"] = "png"


class VideoRequest(GenerationRequest):
    n: Literal[1] = 1
    num_frames: int | None = Field(None, ge=1, description=f"{MODEL_DEFAULT}; at most its `max_frames`")
    fps: int = Field(DEFAULT_FPS, ge=1, le=MAX_FPS)
    output_format: Literal["mp4", "gif", "webp"] = "mp4"


class OutputBody(BaseModel):
    index: int
    url: str
    content_type: str
    width: int
    height: int
    seed: int
    num_frames: int | None = None


class JobBody(BaseModel):
    """A job as clients see it."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    object: Literal["job"] = "job"
    kind: Literal["image", "video"]
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "canceled"]
    progress: int
    queue_position: int | None
    eta_s: float | None = Field(
        None,  # absent from older APIs' jobs, which the Python client still reads
        description="seconds until the job's last denoising step, estimated from measured step times "
        "and the queue ahead (null when ended, or before anything has been measured)",
    )
    created_at: float | None
    started_at: float | None
    completed_at: float | None
    request: JobRequest
    outputs: list[OutputBody]
    error: JobError | None
    deliveries: list[WebhookDelivery] = Field(
        description="with a webhook_url: the delivery of each event sent so far (started, progress: the "
        "latest, completed: the final state), with its attempts; empty otherwise"
    )


class LoraRegistration(BaseModel):
    """POST /v1/loras: register an adapter of a served model from files the server can read."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(min_length=1, max_length=200, description="the served base model")
    name: str = Field(pattern=NAME_PATTERN, description="its name for requests' `loras`")
    source: str = Field(
        min_length=1,
        max_length=4096,
        description="a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or a "
        "diffusers LoRA .safetensors file, as a path on the API's host",
    )


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraInfo]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelSpec]


class JobList(BaseModel):
    """One page of jobs, newest first; pass `last_id` as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[JobBody]
    has_more: bool
    last_id: str | None = Field(description="the cursor for the next page: pass it as `after`")


class ErrorDetail(BaseModel):
    """What went wrong: a code for programs, a message for people."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="machine-readable, one per cause, e.g. `job_not_found`")
    message: str = Field(description="what went wrong and what to do about it")
    request_id: str | None = Field(
        None, description="5xx only: the id the API logged the fault under (also in `X-Request-ID`)"
    )


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"code", "message", "request_id"?}}` (app/errors.py)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail
