"""Tests for dit_serve.storage: LocalStorage on a temp dir, S3Storage against a real moto server over HTTP."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import boto3
import pytest

from dit_serve.storage import (
    LocalStorage,
    OutputNotFoundError,
    S3Storage,
    Storage,
    make_storage,
    output_key,
    output_prefix,
)
from tests.conftest import BUCKET, REGION

PNG_TYPE = "image/png"


def _files(root: Path) -> list[str]:
    """Return every file under root, relative, sorted (temp files included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- LocalStorage -------------------------------------------------------------------------------------------


def test_local_round_trip(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    key = output_key("abc123", 0, "png")
    assert key == "jobs/abc123/0.png"
    assert not storage.exists(key)
    storage.put(key, b"\x89PNG data", PNG_TYPE)
    assert storage.exists(key)
    assert storage.get(key) == b"\x89PNG data"
    assert (tmp_path / "jobs" / "abc123" / "0.png").read_bytes() == b"\x89PNG data"
    storage.put(key, b"replaced", PNG_TYPE)
    assert storage.get(key) == b"replaced"
    storage.delete(key)
    assert not storage.exists(key)
    storage.delete(key)  # missing: no error
    assert isinstance(storage, Storage)


def test_local_put_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for index in range(3):
        storage.put(output_key("job", index, "png"), bytes([index + 1]) * 100, PNG_TYPE)
    assert _files(tmp_path) == ["jobs/job/0.png", "jobs/job/1.png", "jobs/job/2.png"]


def test_local_delete_prefix_removes_one_jobs_outputs_only(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for job_id, count in (("ab", 3), ("abc", 1)):
        for index in range(count):
            storage.put(output_key(job_id, index, "png"), b"x", PNG_TYPE)
    (tmp_path / "jobs" / "ab" / ".tmp-left-by-a-crash.part").write_bytes(b"partial")
    assert output_key("ab", 2, "png").startswith(output_prefix("ab")) and output_prefix("ab") == "jobs/ab/"
    storage.delete_prefix(output_prefix("ab"))
    assert _files(tmp_path) == ["jobs/abc/0.png"]  # "jobs/ab/" is a directory, not "jobs/ab*"
    storage.delete_prefix(output_prefix("ab"))  # already gone: no error
    storage.delete_prefix("never/written/")
    for bad in ("jobs/ab", "", "/", "../jobs/", "/abs/"):
        with pytest.raises(ValueError):
            storage.delete_prefix(bad)


def test_local_delete_prefix_raises_what_it_cannot_delete(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "j").write_bytes(b"a file where the job's directory should be")
    with pytest.raises(NotADirectoryError):  # not swallowed: the sweep logs it and tries again later
        storage.delete_prefix("jobs/j/")


def test_local_stored_file_is_readable_by_others(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("a/b.png", b"x", PNG_TYPE)
    assert (tmp_path / "a" / "b.png").stat().st_mode & 0o777 == 0o644


def test_local_rejects_empty_data(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        storage.put("jobs/j/0.png", b"", PNG_TYPE)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("key", ["../escape.png", "jobs/../../escape.png", "/etc/passwd", "", "jobs\\x.png"])
def test_local_rejects_unsafe_keys(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(ValueError):
        storage.put(key, b"data", PNG_TYPE)
    with pytest.raises(ValueError):
        storage.get(key)
    assert not (tmp_path / "escape.png").exists()


def test_local_get_missing_raises(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(OutputNotFoundError, match="jobs/none/0.png") as info:
        storage.get("jobs/none/0.png")
    assert isinstance(info.value, KeyError)


def test_local_failed_replace_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path)
    storage.put("jobs/j/0.png", b"old complete object", PNG_TYPE)

    def disk_full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        storage.put("jobs/j/1.png", b"new data", PNG_TYPE)
    with pytest.raises(OSError, match="No space left"):
        storage.put("jobs/j/0.png", b"new data", PNG_TYPE)
    monkeypatch.undo()
    assert _files(tmp_path) == ["jobs/j/0.png"]  # no temp file, no partial 1.png
    assert storage.get("jobs/j/0.png") == b"old complete object"  # the failed overwrite did not touch it


def test_local_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LocalStorage(tmp_path)

    def fsync_fails(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="Input/output error"):
        storage.put("jobs/j/0.png", b"data" * 1000, PNG_TYPE)
    monkeypatch.undo()
    assert _files(tmp_path) == []


def test_local_reader_never_sees_partial_object(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    key = "jobs/j/0.png"
    payloads = [bytes([n]) * (50_000 + n * 1000) for n in range(1, 6)]
    storage.put(key, payloads[0], PNG_TYPE)
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(storage.get(key))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(20):
            for payload in payloads:
                storage.put(key, payload, PNG_TYPE)
    finally:
        stop.set()
        thread.join()
    assert seen <= set(payloads)


def test_local_check(tmp_path: Path) -> None:
    LocalStorage(tmp_path / "new" / "dir").check()  # created on demand
    assert (tmp_path / "new" / "dir").is_dir()
    assert _files(tmp_path) == []  # the probe file is removed
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    with pytest.raises(RuntimeError, match="a-file"):
        LocalStorage(blocker).check()


def test_make_storage_and_output_key(tmp_path: Path) -> None:
    storage = make_storage("local", output_dir=tmp_path)
    assert isinstance(storage, LocalStorage) and storage.root == tmp_path
    with pytest.raises(ValueError, match="DIT_S3_BUCKET"):
        make_storage("s3", output_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown storage backend"):
        make_storage("ftp", output_dir=tmp_path)
    assert output_key("j1", 3, "mp4") == "jobs/j1/3.mp4"
    with pytest.raises(ValueError):
        output_key("../x", 0, "png")


# --- S3Storage against a real moto server -------------------------------------------------------------------


def test_s3_round_trip_with_prefix(moto_endpoint: str) -> None:
    storage = S3Storage(BUCKET, prefix="/outputs/", endpoint_url=moto_endpoint, region=REGION)
    assert isinstance(storage, Storage)
    key = output_key("job42", 1, "mp4")
    assert not storage.exists(key)
    storage.put(key, b"\x00\x00\x00 ftypisom", "video/mp4")
    assert storage.exists(key)
    assert storage.get(key) == b"\x00\x00\x00 ftypisom"

    raw = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    head = raw.head_object(Bucket=BUCKET, Key="outputs/jobs/job42/1.mp4")
    assert head["ContentType"] == "video/mp4"
    assert head["ContentLength"] == len(b"\x00\x00\x00 ftypisom")

    storage.delete(key)
    assert not storage.exists(key)
    storage.delete(key)  # missing: no error
    with pytest.raises(OutputNotFoundError):
        storage.get(key)


def test_s3_delete_prefix_pages_through_one_jobs_objects_only(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dit_serve.storage.S3_LIST_PAGE", 2)  # several pages, one DeleteObjects each
    storage = S3Storage(BUCKET, prefix="sweep", endpoint_url=moto_endpoint, region=REGION)
    for job_id, count in (("ab", 5), ("abc", 1)):
        for index in range(count):
            storage.put(output_key(job_id, index, "png"), b"x", PNG_TYPE)
    storage.delete_prefix(output_prefix("ab"))
    raw = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    left = raw.list_objects_v2(Bucket=BUCKET, Prefix="sweep/").get("Contents", [])
    assert [item["Key"] for item in left] == ["sweep/jobs/abc/0.png"]
    storage.delete_prefix(output_prefix("ab"))  # nothing left: no error
    storage.delete_prefix(output_prefix("abc"))
    assert raw.list_objects_v2(Bucket=BUCKET, Prefix="sweep/").get("KeyCount") == 0
    with pytest.raises(ValueError):
        storage.delete_prefix("jobs/ab")


def test_s3_explicit_credentials_and_no_prefix(moto_endpoint: str) -> None:
    storage = S3Storage(
        BUCKET, endpoint_url=moto_endpoint, region=REGION, access_key_id="test", secret_access_key="test"
    )
    storage.put("jobs/j/0.png", b"png bytes", PNG_TYPE)
    raw = boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    assert raw.get_object(Bucket=BUCKET, Key="jobs/j/0.png")["Body"].read() == b"png bytes"
    storage.delete("jobs/j/0.png")


def test_s3_missing_key_and_bad_input(moto_endpoint: str) -> None:
    storage = S3Storage(BUCKET, prefix="p", endpoint_url=moto_endpoint, region=REGION)
    with pytest.raises(OutputNotFoundError, match="jobs/nope/0.png"):
        storage.get("jobs/nope/0.png")
    with pytest.raises(ValueError, match="empty"):
        storage.put("jobs/j/0.png", b"", PNG_TYPE)
    with pytest.raises(ValueError):
        storage.put("../j/0.png", b"x", PNG_TYPE)
    assert not storage.exists("jobs/j/0.png")


def test_s3_check(moto_endpoint: str) -> None:
    S3Storage(BUCKET, endpoint_url=moto_endpoint, region=REGION).check()
    missing = S3Storage("no-such-bucket", endpoint_url=moto_endpoint, region=REGION)
    with pytest.raises(RuntimeError, match="no-such-bucket") as info:
        missing.check()
    assert moto_endpoint in str(info.value)


def test_make_storage_s3(moto_endpoint: str, tmp_path: Path) -> None:
    storage = make_storage(
        "s3",
        output_dir=tmp_path,
        s3_bucket=BUCKET,
        s3_prefix="x",
        s3_endpoint_url=moto_endpoint,
        s3_region=REGION,
    )
    assert isinstance(storage, S3Storage)
    storage.check()
    storage.put("jobs/k/0.gif", b"GIF89a", "image/gif")
    assert storage.get("jobs/k/0.gif") == b"GIF89a"
    assert _files(tmp_path) == []  # nothing written locally
