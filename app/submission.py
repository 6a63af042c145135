"""Turn a validated request into a normalised job for one served model, or a clear 4xx error."""

import secrets
import uuid
from collections.abc import Mapping

from app.errors import InvalidRequest, ServiceUnavailable
from dit_serve.caching import CacheChoice, CachePolicy, resolve
from dit_serve.contract import ClientOptions, ConditioningKind, JobKind, JobRequest, ModelSpec, WebhookEvent
from dit_serve.labels import UnknownLabelError, label_id
from dit_serve.loras import AppliedLora
from dit_serve.schemas import MAX_SEED, GenerationRequest, ImageRequest, VideoRequest
from dit_serve.webhook_guard import AllowList, Resolver, WebhookURLRefused, check_url, system_resolver


def choose_model(
    requested: str | None, kind: JobKind, served: dict[str, ModelSpec], default: str | None
) -> ModelSpec:
    """The model a request names, or the default for its kind; refused when no live worker serves it."""
    of_kind = {name: spec for name, spec in served.items() if spec.kind == kind.value}
    if requested is None:
        if default in of_kind:
            return of_kind[default]
        if not of_kind:
            raise ServiceUnavailable(
                f"no live worker serves a {kind.value} model; start `dit-serve worker`", "no_model"
            )
        return of_kind[sorted(of_kind)[0]]
    if requested not in served:
        names = ", ".join(sorted(served)) or "none (no live worker)"
        raise InvalidRequest(
            f"model {requested!r} is not served by any live worker; served: {names}", "unknown_model"
        )
    if requested not in of_kind:
        raise InvalidRequest(
            f"model {requested!r} makes {served[requested].kind}s, not {kind.value}s", "wrong_kind"
        )
    return of_kind[requested]


def _conditions(request: GenerationRequest, n: int, spec: ModelSpec) -> dict[str, object]:
    """The request's condition fields for this model: class ids, or a prompt and negative prompt."""
    if spec.conditioning is ConditioningKind.TEXT:
        if request.prompt is None:
            raise InvalidRequest(
                f"model {spec.name} takes a text prompt; class_labels is for class-conditional models"
            )
        return {"prompt": request.prompt, "negative_prompt": request.negative_prompt or ""}
    if request.negative_prompt is not None:
        raise InvalidRequest(
            f"model {spec.name} is class-conditional (prompts name its labels); "
            "negative_prompt is for text models"
        )
    return {"prompt": request.prompt, "class_labels": _class_labels(request, n, spec)}


def _class_labels(request: GenerationRequest, n: int, spec: ModelSpec) -> list[int]:
    num_classes = spec.num_classes or len(spec.labels or [])
    if request.prompt is not None:
        if not spec.labels:
            raise InvalidRequest(
                f"model {spec.name} has no label names (its model_index.json has no id2label), so a prompt "
                f"cannot name a class; send class_labels with ids 0..{num_classes - 1} instead",
                "no_label_names",
            )
        try:
            return [label_id(request.prompt, spec.labels)] * n
        except UnknownLabelError as exc:
            raise InvalidRequest(str(exc), "unknown_label") from exc
    ids = list(request.class_labels or [])
    if len(ids) not in (1, n):
        raise InvalidRequest(f"class_labels has {len(ids)} ids; give 1 (for all outputs) or n = {n}")
    for class_id in ids:
        if not 0 <= class_id < num_classes:
            raise InvalidRequest(
                f"class label {class_id} out of range: model {spec.name} has ids 0..{num_classes - 1}"
            )
    return ids * n if len(ids) == 1 else ids


def _size_supported(width: int, height: int, spec: ModelSpec) -> bool:
    if f"{width}x{height}" in spec.sizes:
        return True
    multiple, max_pixels = spec.size_multiple, spec.max_pixels
    return bool(multiple and width % multiple == 0 and height % multiple == 0) and (
        max_pixels is None or width * height <= max_pixels
    )


def _size(request: GenerationRequest, spec: ModelSpec) -> tuple[int, int]:
    size = request.size or spec.default_size
    width, height = (int(part) for part in size.split("x"))
    if not _size_supported(width, height, spec):
        supported = ", ".join(spec.sizes)
        if spec.size_multiple:
            supported += f", or any WxH with sides multiples of {spec.size_multiple}"
            supported += f" and at most {spec.max_pixels} pixels" if spec.max_pixels else ""
        raise InvalidRequest(
            f"size {size} not supported by {spec.name}; supported: {supported}", "unsupported_size"
        )
    return width, height


def _frames(request: VideoRequest, spec: ModelSpec) -> int:
    max_frames = spec.max_frames or 1
    frames = request.num_frames or spec.defaults.num_frames or max_frames
    if frames > max_frames:
        raise InvalidRequest(f"num_frames {frames} is more than {spec.name}'s maximum of {max_frames}")
    step = spec.frames_multiple
    if (frames - 1) % step:
        raise InvalidRequest(
            f"num_frames {frames} does not fit {spec.name}: it takes 1 + a multiple of {step} frames "
            f"(1, {1 + step}, {1 + 2 * step}, ..., up to {max_frames})"
        )
    return frames


def _cache(
    request: GenerationRequest, spec: ModelSpec, defaults: Mapping[str, CacheChoice]
) -> CachePolicy | None:
    """The step-caching policy the job runs with: the request's, else the server's default for the model."""
    policy = resolve(request.cache, spec.cache_auto, defaults.get(spec.name))
    if policy is not None and policy.policy.value not in spec.cache_policies:
        offered = ", ".join(spec.cache_policies) or "none (its family has no block stack to cache)"
        raise InvalidRequest(
            f"model {spec.name} has no {policy.policy.value} step caching; its policies: {offered}",
            "unsupported_cache",
        )
    return policy


def _loras(request: GenerationRequest, spec: ModelSpec) -> list[AppliedLora]:
    """The adapters the job applies, resolved from the model's registered ones."""
    available = {info.name: info for info in spec.loras}
    applied = []
    for ref in request.loras or []:
        info = available.get(ref.name)
        if info is None:
            offered = (
                ", ".join(sorted(available))
                or "none (an operator registers them with --lora or POST /v1/loras)"
            )
            raise InvalidRequest(
                f"model {spec.name} has no LoRA adapter {ref.name!r}; its adapters: {offered}", "unknown_lora"
            )
        applied.append(AppliedLora.of(info, ref.scale))
    return applied


def normalise(
    request: ImageRequest | VideoRequest,
    kind: JobKind,
    spec: ModelSpec,
    cache_defaults: Mapping[str, CacheChoice] | None = None,
) -> JobRequest:
    """The full request with every default filled in from the model's spec and the seed chosen.

    `cache_defaults`: the server's step-caching default per model name (`--cache MODEL=POLICY`).
    """
    width, height = _size(request, spec)
    frames, fps = (_frames(request, spec), request.fps) if isinstance(request, VideoRequest) else (1, None)
    events = request.webhook_events
    if request.webhook_url is not None and events is None:
        events = [WebhookEvent.COMPLETED]
    return JobRequest(
        **request.model_dump(include=set(ClientOptions.model_fields)),  # fields that pass through as given
        kind=kind,
        model=spec.name,
        **_conditions(request, request.n, spec),  # type: ignore[arg-type]
        n=request.n,
        width=width,
        height=height,
        num_inference_steps=request.num_inference_steps or spec.defaults.num_inference_steps,
        guidance_scale=spec.defaults.guidance_scale
        if request.guidance_scale is None
        else request.guidance_scale,
        seed=request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1),
        output_format=request.output_format,  # type: ignore[arg-type]
        num_frames=frames,
        fps=fps,
        cache=_cache(request, spec, cache_defaults or {}),
        loras=_loras(request, spec),
    ).model_copy(update={"webhook_events": events})


def check_webhook(
    job: JobRequest,
    secret: str | None,
    allow: AllowList,
    owner: str | None,
    resolver: Resolver = system_resolver,
) -> None:
    """Refuse a webhook that could not be signed (422 no_webhook_secret) or may not be sent to its URL
    (422 webhook_url_forbidden); the URL's host is resolved, but nothing is connected to."""
    if job.webhook_url is None:
        return
    if secret is None:
        raise InvalidRequest(
            f"API key {owner!r} has no webhook signing secret (it was made before webhooks); make a new "
            "key with `dit-serve keys create` to use webhook_url"
            if owner is not None
            else "webhooks are signed, and this server has no secret to sign them with: to accept "
            "webhook_url, the operator must set DIT_WEBHOOK_SECRET (whsec_ + base64 of 32 random bytes; "
            "see the configuration docs)",
            "no_webhook_secret",
        )
    try:
        check_url(job.webhook_url, allow, resolver)
    except WebhookURLRefused as exc:
        raise InvalidRequest(str(exc), "webhook_url_forbidden") from exc


def new_job_id() -> str:
    return uuid.uuid4().hex
