"""Request and response bodies of the OpenAI-compatible routes (OpenAI's field names and shapes).

`OpenAIImageRequest` is our `ImageRequest` (its fields, seed, num_inference_steps, guidance_scale,
negative_prompt, class_labels, priority, queue_timeout_s, ..., are the extensions) plus OpenAI's own
fields; `VideoForm` is what `client.videos.create` posts as multipart/form-data, plus the same
extensions. What is accepted but has no effect is listed in IGNORED_IMAGE_FIELDS.
"""

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dit_serve.contract import MAX_QUEUE_TIMEOUT_S, Priority
from dit_serve.loras import MAX_LORA_SCALE, NAME_PATTERN, LoraRef, check_lora_list
from dit_serve.schemas import (
    MAX_FPS,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    SIZE_PATTERN,
    ImageRequest,
)

AUTO = "auto"
MAX_COMPRESSION = 100
MAX_PARTIAL_IMAGES = 3
# Accepted so that any SDK call goes through, and documented as having no effect here: there is no
# quality tier, no transparency, no style, no moderation pass; `user` and `safety_identifier` are
# only recorded by OpenAI. `output_compression` has no effect either: the worker encodes JPEG and WebP
# at a fixed quality (95) and PNG losslessly, and the job contract has no field to carry it yet.
IGNORED_IMAGE_FIELDS = (
    "quality",
    "background",
    "style",
    "moderation",
    "user",
    "safety_identifier",
    "output_compression",
)
LORA_LIST = TypeAdapter(list[LoraRef])
MAX_LORAS_JSON_CHARS = 1000  # three adapters' names and scales, with room to spare
SECONDS_PATTERN = r"^[0-9]{1,3}(\.[0-9]{1,3})?$"  # "4", "8", "12" (OpenAI's), or any duration like "2.5"


class OpenAIImageRequest(ImageRequest):
    """`POST /v1/images/generations`: OpenAI's image generation body, with our fields as extensions."""

    size: str | None = Field(  # type: ignore[assignment]  # OpenAI's "auto" besides our "WxH"
        None,
        pattern=f"{SIZE_PATTERN}|^{AUTO}$",
        description='"WxH" among the model\'s sizes, or "auto": the model\'s `default_size`',
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json",
        description="b64_json: the bytes in the answer; url: a link to GET /v1/jobs/{id}/outputs/{k}",
    )
    output_compression: int | None = Field(
        None, ge=0, le=MAX_COMPRESSION, description="accepted, no effect (JPEG/WebP quality is fixed at 95)"
    )
    stream: bool | None = Field(
        None,
        description="true: Server-Sent Events, image_generation.partial_image (partial_images of them per "
        "image) then one image_generation.completed per image",
    )
    partial_images: int | None = Field(
        None,
        ge=0,
        le=MAX_PARTIAL_IMAGES,
        description="with stream: previews per image, taken during denoising (default 0)",
    )
    quality: str | None = Field(None, max_length=20, description="accepted, no effect")
    background: str | None = Field(None, max_length=20, description="accepted, no effect")
    style: str | None = Field(None, max_length=20, description="accepted, no effect")
    moderation: str | None = Field(None, max_length=20, description="accepted, no effect")
    user: str | None = Field(None, max_length=256, description="accepted, no effect")
    safety_identifier: str | None = Field(None, max_length=256, description="accepted, no effect")

    def job_request(self) -> ImageRequest:
        """Our image request: OpenAI's own fields dropped, `size: auto` as no size (the model's)."""
        fields = self.model_dump(exclude_unset=True, include=set(ImageRequest.model_fields))
        if fields.get("size") == AUTO:
            del fields["size"]
        return ImageRequest.model_validate(fields)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    """OpenAI's answer to an image generation."""

    created: int = Field(description="unix seconds: when the job was accepted")
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"]
    size: str
    id: str = Field(description="extension: the job id, for GET /v1/jobs/{id}")
    seed: int = Field(description="extension: the seed of the first image; image k used seed + k")


class TokenDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class Usage(BaseModel):
    """OpenAI counts tokens of its GPT image models; ours have none, so every count is 0."""

    input_tokens: int = 0
    input_tokens_details: TokenDetails = TokenDetails()
    output_tokens: int = 0
    total_tokens: int = 0


class PartialImageEvent(BaseModel):
    """`stream: true`: a preview of one image, taken during denoising (a job `preview` event)."""

    type: Literal["image_generation.partial_image"] = "image_generation.partial_image"
    b64_json: str = Field(description="a PNG decoded cheaply from the predicted clean latent")
    created_at: int
    size: str
    quality: Literal["auto"] = "auto"
    background: Literal["auto"] = "auto"
    output_format: Literal["png"] = "png"
    partial_image_index: int = Field(description="0-based, per image")
    index: int = Field(description="extension: which image of the n it previews")


class CompletedImageEvent(BaseModel):
    """`stream: true`: one finished image (one such event per image of the n)."""

    type: Literal["image_generation.completed"] = "image_generation.completed"
    b64_json: str
    created_at: int
    size: str
    quality: Literal["auto"] = "auto"
    background: Literal["auto"] = "auto"
    output_format: Literal["png", "jpeg", "webp"]
    usage: Usage = Usage()
    index: int = Field(description="extension: which image of the n this is")


class VideoForm(BaseModel):
    """`POST /v1/videos` as multipart/form-data: OpenAI's create-video form, with our fields as extensions."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(
        None, min_length=1, max_length=200, description="default: the default video model"
    )
    seconds: str | None = Field(
        None,
        pattern=SECONDS_PATTERN,
        description="the clip's duration: sets the playback rate of the model's frames (README, "
        '"OpenAI-compatible API"); default: the frames at 8 fps',
    )
    size: str | None = Field(
        None, pattern=SIZE_PATTERN, description='"WxH"; default: the model\'s default_size'
    )
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="text models only")
    num_frames: int | None = Field(None, ge=1, description="default: the model's")
    fps: int | None = Field(None, ge=1, le=MAX_FPS, description="default: from seconds, else 8")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    priority: Priority = Priority.NORMAL
    queue_timeout_s: int | None = Field(None, ge=1, le=MAX_QUEUE_TIMEOUT_S)
    loras: str | None = Field(
        None,
        max_length=MAX_LORAS_JSON_CHARS,
        description='LoRA adapters as JSON text, `[{"name": "outline", "scale": 0.8}]` (the `loras` of '
        "POST /v1/videos as JSON); or the SDK's form fields below",
    )
    lora_names: list[Annotated[str, Field(pattern=NAME_PATTERN)]] | None = Field(
        None,
        alias="loras[][name]",
        description='what the SDK sends for `extra_body={"loras": [...]}`: each adapter\'s name, in order',
    )
    lora_scales: list[Annotated[float, Field(ge=0.0, le=MAX_LORA_SCALE)]] | None = Field(
        None,
        alias="loras[][scale]",
        description="each adapter's scale, in the order of the names: all of them or none (default 1)",
    )

    _refs: list[LoraRef] | None = PrivateAttr(None)  # `loras` or the form fields, parsed

    @field_validator("loras")
    @classmethod
    def _a_request_list(cls, text: str | None) -> str | None:
        if text is not None:
            check_lora_list(_lora_list(text))
        return text

    @field_validator("lora_names")
    @classmethod
    def _each_once(cls, names: list[str] | None) -> list[str] | None:
        check_lora_list([LoraRef.model_construct(name=name) for name in names or []])
        return names

    @field_validator("lora_scales")
    @classmethod
    def _paired_with_names(cls, scales: list[float] | None, info: ValidationInfo) -> list[float] | None:
        names = info.data.get("lora_names")
        if scales is not None and len(scales) != len(names or []):
            raise ValueError(
                "give every adapter a scale, or none: the form's names and scales are paired by order "
                "(or send loras as JSON text in `loras`)"
            )
        return scales

    @model_validator(mode="after")
    def _loras_from_fields(self) -> "VideoForm":
        """The SDK sends a list of objects as one repeated form field per key: pair them up again."""
        if self.lora_names is not None:
            if self.loras is not None:
                raise ValueError("give loras once: as JSON text in `loras`, or as loras[][name] form fields")
            scales = self.lora_scales or [1.0] * len(self.lora_names)
            self._refs = [LoraRef(name=n, scale=s) for n, s in zip(self.lora_names, scales, strict=True)]
        elif self.loras is not None:
            self._refs = _lora_list(self.loras)
        return self

    def lora_refs(self) -> list[LoraRef] | None:
        """The adapters the form asks for, however it gave them."""
        return self._refs


def _lora_list(text: str) -> list[LoraRef]:
    try:
        return LORA_LIST.validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'loras'}: {e['msg']}" for e in exc.errors())
        raise ValueError(
            f'loras must be a JSON list like [{{"name": "outline", "scale": 0.8}}] ({problems})'
        ) from None


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """OpenAI's video object for one of our video jobs."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"] = Field(
        description="a canceled job is `failed`, with error code `canceled`"
    )
    progress: int
    created_at: int
    completed_at: int | None
    expires_at: int | None = Field(description="when the video and its record are deleted (DIT_JOB_TTL_S)")
    prompt: str | None
    size: str
    seconds: str = Field(description="the clip's duration: num_frames / fps")
    remixed_from_video_id: None = None
    error: VideoError | None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None = Field(description="the cursor for the next page: pass it as `after`")
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, rate_limit_error, server_error"
    )
    param: str | None = Field(description="the request field the error is about, if any")
    code: str | None = Field(description="our error code, e.g. `unsupported_size`")


class OpenAIErrorBody(BaseModel):
    """Every error answer of the OpenAI-compatible routes (app/openai_errors.py)."""

    error: OpenAIErrorDetail
