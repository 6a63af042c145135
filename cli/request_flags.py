"""Command-line flags made from the API's request models, so a request field is declared once.

Every field of `ImageRequest` and `VideoRequest` becomes `--field-name` (underscores as dashes), typed
and described as the model declares it; `ALIASES` adds short names. Values are checked by the same
pydantic models when the request is built, not by argparse, so the rules live in one place.
"""

import argparse
import types
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dit_serve.contract import ClientOptions

ALIASES = {
    "n": ["-n"],
    "num_inference_steps": ["--steps"],
    "output_format": ["--format"],
    "guidance_scale": ["--guidance"],
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        kept = [arg for arg in get_args(annotation) if arg is not type(None)]
        return kept[0] if len(kept) == 1 else str
    return annotation


def _scalar(annotation: Any) -> tuple[type, list[str] | None]:
    """The argparse type of one value, and its choices when the field takes a fixed set."""
    if get_origin(annotation) is Literal:
        values = get_args(annotation)
        return type(values[0]), [str(value) for value in values]
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return str, [member.value for member in annotation]
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def _argument(info: FieldInfo) -> dict[str, Any]:
    annotation = _without_none(info.annotation)
    many = get_origin(annotation) is list
    value_type, choices = _scalar(get_args(annotation)[0] if many else annotation)
    argument: dict[str, Any] = {"type": value_type, "default": None}
    if many:
        argument["nargs"] = "+"
    if choices and value_type is str:
        argument["choices"] = choices
    return argument


def add_request_flags(
    parser: "argparse._ActionsContainer", models: dict[str, type[BaseModel]], skip: frozenset[str]
) -> list[str]:
    """Add a flag for each field of `models` (keyed by kind, named in the help of a field that only
    some kinds have) but those in `skip`: the generation fields first, then the options every job
    takes. Returns the fields' names, which are the flags' `dest`s."""
    names = list(dict.fromkeys(name for model in models.values() for name in model.model_fields))
    names = sorted(
        (name for name in names if name not in skip), key=lambda name: name in ClientOptions.model_fields
    )
    for name in names:
        owners = [kind for kind, model in models.items() if name in model.model_fields]
        arguments = [_argument(models[kind].model_fields[name]) for kind in owners]
        argument = arguments[0]
        choices = sorted({choice for each in arguments for choice in each.get("choices", [])})
        if choices:
            argument["choices"] = choices  # e.g. output_format: the image formats and the video ones
        info = models[owners[0]].model_fields[name]
        only = f" ({' and '.join(owners)} only)" if len(owners) < len(models) else ""
        help_text = ((info.description or "") + only).strip()
        parser.add_argument(
            _flag(name), *ALIASES.get(name, []), dest=name, help=help_text.replace("%", "%%"), **argument
        )
    return names


def given_fields(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The request fields set on the command line (a flag left out leaves the server's default)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
