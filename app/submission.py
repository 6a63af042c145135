"""Turn a validated request into a normalised job for one served model, or a clear 4xx error."""

import json
import secrets
import time
import uuid

from app.errors import InvalidRequest, ServiceUnavailable
from app.schemas import MAX_SEED, GenerationRequest, ImageRequest, VideoRequest
from dit_serve.catalog import ModelSpec
from dit_serve.jobs import TEXT_CONDITIONING, JobKind, RecordField, compat_key
from dit_serve.labels import UnknownLabelError, label_id


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


def _conditions(request: GenerationRequest, n: int, spec: ModelSpec) -> dict:
    """The request's condition fields for this model: class ids, or a prompt and negative prompt."""
    if spec.conditioning == TEXT_CONDITIONING:
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
    labels = spec.labels or []
    if request.prompt is not None:
        try:
            return [label_id(request.prompt, labels)] * n
        except UnknownLabelError as exc:
            raise InvalidRequest(str(exc), "unknown_label") from exc
    ids = list(request.class_labels or [])
    if len(ids) not in (1, n):
        raise InvalidRequest(f"class_labels has {len(ids)} ids; give 1 (for all outputs) or n = {n}")
    for class_id in ids:
        if not 0 <= class_id < len(labels):
            raise InvalidRequest(
                f"class label {class_id} out of range: model {spec.name} has ids 0..{len(labels) - 1}"
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


def normalise(request: ImageRequest | VideoRequest, kind: JobKind, spec: ModelSpec) -> dict:
    """The full request with every default filled in and the seed chosen; what the worker runs."""
    width, height = _size(request, spec)
    n = request.n
    normalised = {
        "kind": kind.value,
        "model": spec.name,
        **_conditions(request, n, spec),
        "n": n,
        "size": f"{width}x{height}",
        "width": width,
        "height": height,
        "num_inference_steps": request.num_inference_steps or spec.defaults.num_inference_steps,
        "guidance_scale": spec.defaults.guidance_scale
        if request.guidance_scale is None
        else request.guidance_scale,
        "seed": request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1),
        "output_format": request.output_format,
    }
    if isinstance(request, VideoRequest):
        normalised |= {"num_frames": _frames(request, spec), "fps": request.fps}
    return normalised


def new_record(normalised: dict, kind: JobKind) -> tuple[str, dict[str, str]]:
    """A fresh job id and the fields of its record."""
    frames = int(normalised.get("num_frames", 1))
    compat = compat_key(
        normalised["model"],
        kind,
        normalised["width"],
        normalised["height"],
        normalised["num_inference_steps"],
        frames,
    )
    record = {
        RecordField.KIND.value: kind.value,
        RecordField.MODEL.value: normalised["model"],
        RecordField.REQUEST.value: json.dumps(normalised),
        RecordField.COMPAT.value: compat,
        RecordField.SAMPLES.value: str(normalised["n"]),
        RecordField.CREATED_AT.value: repr(time.time()),
        RecordField.PROGRESS.value: "0",
    }
    return uuid.uuid4().hex, record
