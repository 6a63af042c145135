"""Where a model's files come from: a local diffusers directory, or a Hugging Face Hub id to download.

`--model NAME=SOURCE`: SOURCE is a directory (used as it is) or a hub id such as
`facebook/DiT-XL-2-256` (taken from the local hub cache when it is there, else downloaded once). Without
network a hub id fails at once with a message that names the model and says what to do instead.
"""

import re
from pathlib import Path

from models.loading import ModelLoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the hub spells repo ids
# A pipeline needs its index, configs and weights; a hub repo also holds .bin/.ckpt twins, images, docs.
PIPELINE_FILES = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model"]
HUB_TIMEOUT_S = 10.0  # per HTTP request: an unreachable hub fails in seconds, never hangs a worker's start


def is_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and not source.startswith((".", "/"))


def resolve_source(name: str, source: str) -> Path:
    """The local directory that holds the model's pipeline files, downloading a hub id if need be.

    Raises:
        ModelLoadError: SOURCE is neither a directory nor a hub id, or the hub id cannot be fetched.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(source):
        raise ModelLoadError(
            f"model {name!r}: {source} is not a directory; SOURCE must be a diffusers pipeline directory "
            "or a Hugging Face Hub id such as facebook/DiT-XL-2-256"
        )
    return _download(name, source)


def _download(name: str, repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # a diffusers dependency; only hub ids need it
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=PIPELINE_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not in the local cache: download it
    try:
        return Path(snapshot_download(repo_id, allow_patterns=PIPELINE_FILES, etag_timeout=HUB_TIMEOUT_S))
    except RepositoryNotFoundError as exc:
        reason = "the hub has no such repository, or it needs a token (HF_TOKEN)"
        raise ModelLoadError(_download_failed(name, repo_id, reason)) from exc
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no network'}"
        raise ModelLoadError(_download_failed(name, repo_id, reason)) from exc


def _download_failed(name: str, repo_id: str, reason: str) -> str:
    return (
        f"model {name!r}: {repo_id} is not a local directory and could not be downloaded from the "
        f"Hugging Face Hub ({reason}). Where there is network, run "
        f"`hf download {repo_id} --local-dir DIR` and pass --model {name}=DIR"
    )
