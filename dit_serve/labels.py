"""Map prompts to class ids the way DiTPipeline.get_label_ids does, after normalising case and spacing."""

import difflib

NEAREST_SHOWN = 5
ALL_SHOWN_UP_TO = 40  # list every label in the error when there are this few


class UnknownLabelError(ValueError):
    """A prompt that names no label of the model."""


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def label_index(labels: list[str]) -> dict[str, int]:
    """Every name (each id2label entry may hold comma-separated synonyms) to its class id."""
    index: dict[str, int] = {}
    for class_id, entry in enumerate(labels):
        for name in entry.split(","):
            if name.strip():
                index.setdefault(normalise(name), class_id)
    return index


def label_id(prompt: str, labels: list[str]) -> int:
    """The class id a prompt names; raises UnknownLabelError listing valid or nearest labels."""
    index = label_index(labels)
    key = normalise(prompt)
    if key in index:
        return index[key]
    if len(index) <= ALL_SHOWN_UP_TO:
        hint = "valid labels: " + ", ".join(sorted(index))
    else:
        nearest = difflib.get_close_matches(key, list(index), n=NEAREST_SHOWN, cutoff=0.0)
        hint = f"nearest labels: {', '.join(nearest)} (all {len(index)} in GET /v1/models)"
    raise UnknownLabelError(f"prompt {prompt[:80]!r} matches no label of this model; {hint}")
