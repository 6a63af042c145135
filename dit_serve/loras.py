"""LoRA adapters: what a request names, how an adapter is registered, and how its files are read.

An adapter belongs to one served base model and has a name unique for that model. It is registered
once (a worker's `--lora MODEL:NAME=SOURCE` at start, or an admin's `POST /v1/loras`): its files are
read and checked against the model's adaptable layers, its weights are put in the shared storage under
a key named by their digest, and its `LoraInfo` goes to the registry in Redis (dit_serve/lora_registry.py).
The API checks a request's `loras` against the registry; any worker loads an adapter from storage on
first use (worker/lora.py), so every worker host sees every adapter.

SOURCE is a PEFT adapter directory, as `PeftModel.save_pretrained` writes it (`adapter_config.json`
and `adapter_model.safetensors`), or a diffusers LoRA file (`pytorch_lora_weights.safetensors`, its
keys `transformer.<module>.lora_A.weight`). Only plain LoRA on linear layers is taken: DoRA, per-module
alpha patterns and other PEFT methods are refused with the reason.

Files are read here without torch (the API imports this module): a safetensors file is an 8-byte
little-endian header length, a JSON header (each tensor's dtype, shape and byte offsets), then the data.
"""

import hashlib
import json
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

MAX_LORAS_PER_REQUEST = 3
MAX_LORA_SCALE = 2.0
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_ADAPTER_BYTES = 512 * 1024 * 1024  # a LoRA this large is a whole model, not an adapter
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
# A key's module path sits between one of these prefixes and `.lora_A.weight` / `.lora_B.weight`.
KEY_PREFIXES = ("base_model.model.", "transformer.")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
HEADER_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024


class LoraError(ValueError):
    """An adapter that cannot be registered or used: the message says what is wrong and what to do."""


class LoraRef(BaseModel):
    """One adapter a request applies, and how strongly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="an adapter of the model (GET /v1/models: `loras`)")
    scale: float = Field(
        1.0, ge=0.0, le=MAX_LORA_SCALE, description="its strength: 0 is the base model, 1 as trained"
    )


def check_lora_list(loras: Sequence[LoraRef]) -> None:
    """A request's `loras`: at most MAX_LORAS_PER_REQUEST adapters, each named once (ValueError)."""
    if len(loras) > MAX_LORAS_PER_REQUEST:
        raise ValueError(
            f"loras names {len(loras)} adapters; a request applies at most {MAX_LORAS_PER_REQUEST}"
        )
    names = [lora.name for lora in loras]
    if len(set(names)) != len(names):
        raise ValueError("loras names an adapter twice; give each once, with its scale")


class LoraInfo(BaseModel):
    """A registered adapter: the registry's entry, and what GET /v1/models lists."""

    model_config = ConfigDict(frozen=True)

    name: str
    model: str
    rank: int = Field(description="the largest rank of its layers")
    alpha: float = Field(description="its scaling is alpha / rank (alpha / sqrt(rank) with rsLoRA)")
    rslora: bool = False
    layers: int = Field(description="how many linear layers it adapts")
    bytes: int
    digest: str = Field(description="sha256 of its weights file")
    key: str = Field(description="where the shared storage keeps its weights")
    source: str = Field(description="what it was registered from (shown to admin keys only, else empty)")
    registered_at: float


class AppliedLora(BaseModel):
    """An adapter as a job applies it, resolved by the API from the registry: the job needs no lookup."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    scale: float
    digest: str
    key: str
    alpha: float
    rslora: bool = False

    @classmethod
    def of(cls, info: "LoraInfo", scale: float) -> "AppliedLora":
        return cls(
            name=info.name,
            scale=scale,
            digest=info.digest,
            key=info.key,
            alpha=info.alpha,
            rslora=info.rslora,
        )


def shown_to(info: LoraInfo, admin: bool) -> LoraInfo:
    """The entry as a caller sees it: where it was read from on the server is for admins only."""
    return info if admin else info.model_copy(update={"source": ""})


@dataclass(frozen=True)
class AdapterFile:
    """An adapter read from disk: its weights file's bytes and what they hold."""

    weights: bytes
    layers: dict[str, tuple[int, int, int]]  # module path -> (rank, in features, out features)
    alpha: float
    rslora: bool

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()

    @property
    def rank(self) -> int:
        return max(rank for rank, _, _ in self.layers.values())


def parse_lora_flag(value: str) -> tuple[str, str, Path]:
    """`MODEL:NAME=SOURCE` -> (model, name, source path)."""
    head, sep, source = value.partition("=")
    model, colon, name = head.rpartition(":")
    if not sep or not colon or not model or not source:
        raise LoraError(f"--lora {value!r}: write MODEL:NAME=SOURCE, e.g. dit-shapes-image:outline=./outline")
    if not re.match(NAME_PATTERN, name):
        raise LoraError(f"--lora {value!r}: an adapter name is 1-64 letters, digits, '.', '_' or '-'")
    return model, name, Path(source).expanduser()


def safetensors_header(data: bytes) -> dict[str, dict]:
    """The tensors a safetensors file holds: name -> {dtype, shape, data_offsets} (and __metadata__)."""
    if len(data) < HEADER_BYTES:
        raise LoraError("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", data[:HEADER_BYTES])
    if length > min(MAX_HEADER_BYTES, len(data) - HEADER_BYTES):
        raise LoraError("not a safetensors file: its header length is past the end of the file")
    try:
        header = json.loads(data[HEADER_BYTES : HEADER_BYTES + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"not a safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise LoraError("not a safetensors file: its header is not a JSON object")
    return header


def _layers(header: dict[str, dict]) -> dict[str, tuple[int, int, int]]:
    shapes: dict[str, dict[str, list[int]]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        prefix = next((p for p in KEY_PREFIXES if key.startswith(p)), None)
        match = LORA_KEY.match(key[len(prefix) :]) if prefix else None
        if match is None:
            raise LoraError(
                f"tensor {key!r} is not a LoRA weight this server reads: it takes PEFT keys "
                "(base_model.model.<module>.lora_A.weight) or diffusers keys "
                "(transformer.<module>.lora_A.weight); DoRA magnitudes, biases and other adapter types are "
                "not supported"
            )
        shapes.setdefault(match["module"], {})[match["part"]] = list(entry.get("shape", []))
    layers = {}
    for module, parts in shapes.items():
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise LoraError(
                f"layer {module}: lora_A and lora_B must be matrices of the same rank, got {parts}"
            )
        layers[module] = (a[0], a[1], b[0])
    if not layers:
        raise LoraError("the file holds no LoRA weights")
    return layers


def _peft_config(path: Path) -> tuple[float | None, bool]:
    """(lora_alpha, use_rslora) from a PEFT adapter_config.json; refuses what the server does not run."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoraError(f"{path}: cannot read the adapter config ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path}: a {config.get('peft_type')} adapter; only LoRA is supported")
    if config.get("use_dora"):
        raise LoraError(f"{path}: a DoRA adapter; only plain LoRA is supported")
    if config.get("alpha_pattern"):
        raise LoraError(f"{path}: per-module lora_alpha (alpha_pattern) is not supported; use one lora_alpha")
    alpha = config.get("lora_alpha")
    return (float(alpha) if alpha is not None else None), bool(config.get("use_rslora", False))


def read_adapter(source: Path) -> AdapterFile:
    """Read an adapter directory or file (see the module docstring); LoraError says what is wrong."""
    config: Path | None = None
    if source.is_dir():
        if (source / PEFT_WEIGHTS).is_file():
            weights_path, config = source / PEFT_WEIGHTS, source / PEFT_CONFIG
            if not config.is_file():
                raise LoraError(f"{source}: has {PEFT_WEIGHTS} but no {PEFT_CONFIG}")
        elif (source / DIFFUSERS_WEIGHTS).is_file():
            weights_path = source / DIFFUSERS_WEIGHTS
        else:
            raise LoraError(
                f"{source}: neither a PEFT adapter ({PEFT_CONFIG} + {PEFT_WEIGHTS}) nor a diffusers LoRA "
                f"({DIFFUSERS_WEIGHTS})"
            )
    elif source.is_file() and source.suffix == ".safetensors":
        weights_path = source
    else:
        raise LoraError(f"{source}: no such adapter directory or .safetensors file readable by the server")
    size = weights_path.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise LoraError(
            f"{weights_path}: {size} bytes, more than the {MAX_ADAPTER_BYTES} an adapter may have"
        )
    weights = weights_path.read_bytes()
    header = safetensors_header(weights)
    layers = _layers(header)
    alpha, rslora = _peft_config(config) if config else (None, False)
    if alpha is None:  # diffusers files: their metadata, when they carry it, else alpha = rank (scaling 1)
        metadata = json.loads((header.get("__metadata__") or {}).get("lora_adapter_metadata", "{}") or "{}")
        alpha = float(metadata.get("lora_alpha", max(rank for rank, _, _ in layers.values())))
        rslora = bool(metadata.get("use_rslora", False))
    return AdapterFile(weights, layers, alpha, rslora)


def check_fits(adapter: AdapterFile, targets: dict[str, tuple[int, int]], model: str) -> None:
    """Refuse an adapter whose layers are not the model's linear layers of the same shapes."""
    for module, (_rank, in_features, out_features) in sorted(adapter.layers.items()):
        if module not in targets:
            raise LoraError(
                f"the adapter adapts layer {module!r}, which model {model} does not have: it was trained "
                "for another base model"
            )
        if targets[module] != (in_features, out_features):
            raise LoraError(
                f"the adapter's layer {module!r} maps {in_features} -> {out_features} features, and model "
                f"{model}'s maps {targets[module][0]} -> {targets[module][1]}: it was trained for another "
                "base model"
            )


def storage_key(model: str, name: str, digest: str) -> str:
    return f"loras/{model}/{name}/{digest[:32]}.safetensors"


def info_for(model: str, name: str, adapter: AdapterFile, source: str) -> LoraInfo:
    return LoraInfo(
        name=name,
        model=model,
        rank=adapter.rank,
        alpha=adapter.alpha,
        rslora=adapter.rslora,
        layers=len(adapter.layers),
        bytes=len(adapter.weights),
        digest=adapter.digest,
        key=storage_key(model, name, adapter.digest),
        source=source,
        registered_at=time.time(),
    )
