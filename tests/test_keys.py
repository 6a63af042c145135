"""The API key store, the auth defaults, the listing index and the OpenAPI security scheme, in-process."""

import hashlib

from redis import Redis

from app.auth import ANONYMOUS, Caller
from dit_serve.config import AuthMode, Settings, auth_default
from dit_serve.job_index import ALL_JOBS_KEY, INDEX_SLACK_S, index_job, newest_ids, owner_index_key
from dit_serve.jobs import JobRecord
from dit_serve.keys import SECRET_PREFIX, Priority, authenticate, create_key, list_keys, revoke_key
from tests.test_contract import _request

TTL_S = 3600


def all_values(redis: Redis) -> bytes:
    """Every key and value in the database, concatenated: where a leaked secret would show."""
    dump = b""
    for key in redis.keys("*"):
        kind = redis.type(key)
        value = redis.hgetall(key) if kind == b"hash" else redis.get(key) if kind == b"string" else b""
        dump += key + repr(value).encode()
    return dump


def test_keys_are_stored_as_hashes_and_found_by_their_secret(redis: Redis) -> None:
    key, secret = create_key(redis, "alice", rate_per_min=60, max_queued=5, max_priority=Priority.NORMAL)
    assert secret.startswith(SECRET_PREFIX) and len(secret) > 40
    assert secret.encode() not in all_values(redis)
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in all_values(redis)
    assert authenticate(redis, secret) == key
    assert (key.rate_per_min, key.max_queued, key.max_priority, key.admin) == (60, 5, Priority.NORMAL, False)
    for wrong in ("", "dit_", secret[:-1], secret + "x", "Bearer " + secret, secret[len(SECRET_PREFIX) :]):
        assert authenticate(redis, wrong) is None, wrong
    admin, _ = create_key(redis, "ops", admin=True)
    assert list_keys(redis) == [key, admin]
    assert "key_hash" not in list_keys(redis)[0].model_dump()
    assert revoke_key(redis, "alice") and not revoke_key(redis, "alice")
    assert authenticate(redis, secret) is None
    assert list_keys(redis) == [admin]


def test_key_names_are_checked_and_unique(redis: Redis) -> None:
    create_key(redis, "bob")
    for bad in ("", "has space", "x" * 65, "-dash-first"):
        try:
            create_key(redis, bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted key name {bad!r}")
    try:
        create_key(redis, "bob")
    except ValueError as exc:
        assert "exists" in str(exc)
    else:
        raise AssertionError("created a second key named bob")


def test_auth_is_off_by_default_only_for_up_on_loopback() -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        assert auth_default("up", host) is AuthMode.OFF
        assert auth_default("api", host) is AuthMode.ON
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        assert auth_default("up", host) is AuthMode.ON


def test_a_caller_sees_its_own_jobs_and_an_admin_every_job() -> None:
    alice = Caller(name="alice", admin=False)
    assert alice.sees("alice") and not alice.sees("bob") and not alice.sees(None)
    assert Caller(name="ops", admin=True).sees("alice") and ANONYMOUS.sees(None)
    assert alice.listed_owner == "alice" and ANONYMOUS.listed_owner is None


def test_the_listing_index_is_newest_first_and_trimmed_with_the_job_ttl(redis: Redis) -> None:
    old = JobRecord.new(_request(), owner="alice").model_copy(update={"created_at": 1000.0})
    with redis.pipeline() as pipe:
        index_job(pipe, "old", old, TTL_S)
        for i in range(3):
            index_job(pipe, f"a{i}", old.model_copy(update={"created_at": 1e9 + i}), TTL_S)
        index_job(pipe, "anon", old.model_copy(update={"created_at": 1e9 + 5, "owner": None}), TTL_S)
        pipe.execute()
    assert list(newest_ids(redis, owner_index_key("alice"))) == ["a2", "a1", "a0"]  # "old" trimmed
    assert list(newest_ids(redis, ALL_JOBS_KEY, after="a2")) == ["a1", "a0"]
    assert list(newest_ids(redis, ALL_JOBS_KEY))[0] == "anon"
    assert 0 < redis.ttl(ALL_JOBS_KEY) <= TTL_S + INDEX_SLACK_S


def test_openapi_declares_the_bearer_scheme_on_protected_routes() -> None:
    from app.main import create_app

    schema = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()
    assert schema["components"]["securitySchemes"]["APIKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["APIKey"]["description"],
    }
    protected = [
        ("/v1/images", "post"),
        ("/v1/videos", "post"),
        ("/v1/models", "get"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}", "delete"),
        ("/v1/jobs/{job_id}/outputs/{index}", "get"),
    ]
    for path, method in protected:
        assert schema["paths"][path][method].get("security") == [{"APIKey": []}], (path, method)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in schema["paths"][path]["get"], path
