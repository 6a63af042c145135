"""Output storage shared by the API process (reads) and the worker processes (writes).

Keys are relative, "/"-separated paths such as ``jobs/<job_id>/0.png`` (see :func:`output_key`).
Every backend writes atomically: a reader sees either no object or the complete object, never a
partial or zero-byte one.

This module is imported by the API process, so it must not import torch, numpy or PIL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol, runtime_checkable

# boto3 and botocore are imported where S3 is used: they cost the API ~0.15 s of start-up otherwise.

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

    from dit_serve.config import Settings

# Prefix of the temporary files LocalStorage writes next to the final file; the leading dot keeps
# them out of the way of anything listing outputs.
TEMP_PREFIX = ".tmp-"
# Permissions of a stored file: the worker writes it, the API (possibly another user) reads it.
LOCAL_FILE_MODE = 0o644
# S3 error codes that mean "no such object" (get_object says NoSuchKey, head_object says 404).
S3_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# Keep start-up checks and requests from hanging for minutes on an unreachable endpoint.
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 30
S3_MAX_ATTEMPTS = 3
S3_LIST_PAGE = 1000  # keys per ListObjectsV2 page; DeleteObjects takes at most 1000 keys, one page

BACKENDS = ("local", "s3")


class OutputNotFoundError(KeyError):
    """Raised when a stored output does not exist."""

    def __str__(self) -> str:
        """Return the plain message (KeyError would show its repr)."""
        return str(self.args[0]) if self.args else "output not found"


@runtime_checkable
class Storage(Protocol):
    """Where generated outputs are written by workers and read by the API."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store data under key atomically; empty data raises ValueError."""
        ...

    def get(self, key: str) -> bytes:
        """Return the bytes stored under key; raise OutputNotFoundError if missing."""
        ...

    def exists(self, key: str) -> bool:
        """Return whether an object is stored under key."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object under key; no error if it is missing."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object whose key starts with prefix (a "directory", ending in "/"); no error
        if there is none."""
        ...

    def check(self) -> None:
        """Raise a clear error if the store is not usable (called at start-up)."""
        ...


def validate_key(key: str) -> str:
    """Return key if it is a safe relative "/"-separated path, else raise ValueError."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key must be a non-empty string, got {key!r}")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"storage key must not contain backslashes or NUL bytes: {key!r}")
    path = PurePosixPath(key)
    if path.is_absolute():
        raise ValueError(f"storage key must be relative, got absolute key {key!r}")
    if any(part == ".." for part in path.parts):
        raise ValueError(f"storage key must not contain '..': {key!r}")
    if key.endswith("/"):
        raise ValueError(f"storage key must name an object, not a directory: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Return prefix if it is a safe relative "directory" ending in "/" (so "jobs/a/" never matches
    "jobs/ab/..."), else raise ValueError."""
    if not isinstance(prefix, str) or not prefix.endswith("/") or prefix.strip("/") == "":
        raise ValueError(f"storage prefix must be a non-empty directory ending in '/', got {prefix!r}")
    validate_key(prefix.rstrip("/"))
    return prefix


def _check_data(key: str, data: bytes) -> None:
    """Reject empty or non-bytes payloads."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data for {key!r} must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"refusing to store an empty object under {key!r}")


class LocalStorage:
    """Stores outputs as files under a root directory (shared by API and workers)."""

    def __init__(self, root: Path) -> None:
        """Use root as the base directory; it is created on first write or by check()."""
        self.root = Path(root)

    def __repr__(self) -> str:
        """Show the root directory."""
        return f"LocalStorage(root={str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """Return the file path that holds key."""
        return self.root.joinpath(*PurePosixPath(validate_key(key)).parts)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write to a temporary file in the same directory, fsync, then rename onto the final name."""
        final = self.path_for(key)
        _check_data(key, data)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=TEMP_PREFIX, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
                os.fchmod(tmp.fileno(), LOCAL_FILE_MODE)  # mkstemp creates 0600
            os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        _fsync_directory(final.parent)

    def get(self, key: str) -> bytes:
        """Return the file's bytes; raise OutputNotFoundError if it does not exist."""
        path = self.path_for(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise OutputNotFoundError(f"output {key!r} not found in {self.root}") from exc

    def exists(self, key: str) -> bool:
        """Return whether the file for key exists."""
        return self.path_for(key).is_file()

    def delete(self, key: str) -> None:
        """Remove the file for key if present."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.path_for(key).unlink()

    def delete_prefix(self, prefix: str) -> None:
        """Remove the directory for prefix and everything under it (temporary files too), if present."""
        directory = self.root.joinpath(*PurePosixPath(validate_prefix(prefix)).parts)
        # Another sweeper may be removing it too: a first pass ignores files already gone, and a
        # second one, only if something is left, raises what stopped the first (permissions).
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            shutil.rmtree(directory)

    def check(self) -> None:
        """Create the root if needed and prove it is writable by writing and removing a probe file."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=TEMP_PREFIX, suffix=".probe")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise RuntimeError(
                f"output directory {str(self.root)!r} is not usable ({exc}); create it and make it "
                "writable by the worker and readable by the API, or point DIT_OUTPUT_DIR elsewhere"
            ) from exc


def _fsync_directory(directory: Path) -> None:
    """Flush a rename to disk by fsyncing its directory (best effort; not all systems allow it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3Storage:
    """Stores outputs as objects in an S3 (or S3-compatible) bucket; one PutObject is atomic."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        """Create a boto3 client; credentials default to boto3's usual chain (env, profile, role)."""
        if not bucket:
            raise ValueError("S3Storage needs a bucket name (set DIT_S3_BUCKET)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            read_timeout=S3_READ_TIMEOUT_S,
            retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )

    def __repr__(self) -> str:
        """Show bucket, prefix and endpoint (never credentials)."""
        return (
            f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r})"
        )

    def object_key(self, key: str) -> str:
        """Return the full S3 object key for a storage key (prefix joined with "/")."""
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload data in a single PutObject with the given ContentType."""
        object_key = self.object_key(key)
        _check_data(key, data)
        self.client.put_object(Bucket=self.bucket, Key=object_key, Body=bytes(data), ContentType=content_type)

    def get(self, key: str) -> bytes:
        """Download the object; raise OutputNotFoundError if it does not exist."""
        from botocore.exceptions import ClientError

        object_key = self.object_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
        except ClientError as exc:
            if _error_code(exc) in S3_MISSING_CODES:
                raise OutputNotFoundError(
                    f"output {key!r} not found in s3://{self.bucket}/{object_key}"
                ) from exc
            raise
        body = response["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        """Return whether the object exists (HeadObject)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _error_code(exc) in S3_MISSING_CODES:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        """Delete the object; S3 does not complain if it is missing."""
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))

    def delete_prefix(self, prefix: str) -> None:
        """List the objects under prefix and delete them, one DeleteObjects call per listed page.

        Raises RuntimeError naming the first key S3 refused to delete (the call itself succeeds).
        """
        object_prefix = self.object_key(validate_prefix(prefix).rstrip("/")) + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=object_prefix, PaginationConfig={"PageSize": S3_LIST_PAGE}
        )
        for page in pages:
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if not keys:
                continue
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
            if errors := answer.get("Errors"):
                first = errors[0]
                raise RuntimeError(
                    f"S3 refused to delete {len(errors)} objects under s3://{self.bucket}/{object_prefix}, "
                    f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )

    def check(self) -> None:
        """HeadBucket; raise RuntimeError naming the bucket and endpoint if it fails."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            endpoint = self.endpoint_url or "the default AWS endpoint"
            raise RuntimeError(
                f"S3 bucket {self.bucket!r} at {endpoint} is not usable: {exc}. Create the bucket, or fix "
                "DIT_S3_BUCKET / DIT_S3_ENDPOINT_URL / DIT_S3_REGION and the AWS credentials "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) so that this process can reach it"
            ) from exc


def _error_code(exc: ClientError) -> str:
    """Return the error code of a botocore ClientError ("" if absent)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def make_storage(
    backend: str,
    *,
    output_dir: Path,
    s3_bucket: str | None = None,
    s3_prefix: str = "",
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
) -> Storage:
    """Build the storage backend named by backend ("local" or "s3")."""
    name = backend.strip().lower()
    if name == "local":
        return LocalStorage(Path(output_dir))
    if name == "s3":
        if not s3_bucket:
            raise ValueError("storage backend 's3' needs a bucket: set DIT_S3_BUCKET to the bucket name")
        return S3Storage(s3_bucket, prefix=s3_prefix, endpoint_url=s3_endpoint_url or None, region=s3_region)
    expected = ", ".join(BACKENDS)
    raise ValueError(f"unknown storage backend {backend!r} (DIT_STORAGE); expected one of {expected}")


def output_key(job_id: str, index: int, extension: str) -> str:
    """Return the storage key of output number index of a job, e.g. "jobs/<job_id>/0.png"."""
    if not job_id or "/" in job_id or job_id in (".", ".."):
        raise ValueError(f"invalid job id for a storage key: {job_id!r}")
    if index < 0:
        raise ValueError(f"output index must be >= 0, got {index}")
    return f"jobs/{job_id}/{index}.{extension.lstrip('.')}"


def output_prefix(job_id: str) -> str:
    """Return the prefix every output key of a job starts with, e.g. "jobs/<job_id>/"."""
    return output_key(job_id, 0, "x").rsplit("/", 1)[0] + "/"


def storage_from_settings(settings: Settings) -> Storage:
    """The storage backend the settings (DIT_STORAGE, DIT_OUTPUT_DIR, DIT_S3_*) choose."""
    return make_storage(
        settings.storage.value,
        output_dir=settings.output_dir,
        s3_bucket=settings.s3_bucket,
        s3_prefix=settings.s3_prefix,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_region=settings.s3_region,
    )
