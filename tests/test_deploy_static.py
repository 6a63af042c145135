"""Static checks of the container deployment (docker/, docker-compose.yml, .dockerignore); no Docker needed.

The health-check commands are also run for real here, against a real Redis and a real API process, since
they are plain Python one-liners that the images run with the same packages.
"""

import fnmatch
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis
from redis import exceptions as redis_exceptions
from redis.connection import parse_url

from dit_serve.catalog import WORKERS_KEY, publish_worker
from dit_serve.config import Device, StorageBackend, get_settings
from dit_serve.embedded_redis import free_port
from dit_serve.storage import LocalStorage, S3Storage, storage_from_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
DOCKERFILES = {"api": API_DOCKERFILE, "worker": WORKER_DOCKERFILE}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
API_START_TIMEOUT_S = 30.0

# --- parsing helpers ------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and parser directives dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines, too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile.name}: a continuation line runs off the end of the file"
    return result


def of(dockerfile: Path, keyword: str) -> list[str]:
    return [args for name, args in instructions(dockerfile) if name == keyword]


def base_images(dockerfile: Path) -> list[str]:
    """The FROM images, with ARG defaults declared before the first FROM substituted."""
    defaults: dict[str, str] = {}
    images: list[str] = []
    for name, args in instructions(dockerfile):
        if name == "ARG" and not images and "=" in args:
            key, _, value = args.partition("=")
            defaults[key.strip()] = value.strip().strip('"')
        elif name == "FROM":
            image = args.split()[0]
            for key, value in defaults.items():
                image = image.replace("${" + key + "}", value).replace("$" + key, value)
            images.append(image)
    return images


def exec_form(args: str, dockerfile: Path) -> list[str]:
    try:
        command = json.loads(args)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{dockerfile.name}: {args!r} is not an exec-form JSON array") from exc
    assert isinstance(command, list) and all(isinstance(part, str) for part in command)
    return command


HEALTHCHECK_CMD = re.compile(r"(?:--[\w-]+=\S+\s+)*CMD\s+(\[.*\])", re.DOTALL)


def dockerfile_healthcheck(dockerfile: Path) -> list[str]:
    """The HEALTHCHECK's command (exec form), its --options stripped."""
    (args,) = of(dockerfile, "HEALTHCHECK")
    match = HEALTHCHECK_CMD.fullmatch(args)
    assert match, f"{dockerfile.name}: HEALTHCHECK {args!r} is not `[--option=value ...] CMD [...]`"
    return exec_form(match.group(1), dockerfile)


def compose_healthcheck(service: str) -> list[str]:
    test = load_compose()["services"][service]["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", f"{service}: expected an exec-form CMD healthcheck"
    return test[1:]


# What compose refuses to start without (`${VAR:?message}`), with stand-in values for the tests.
REQUIRED_ENV = {"GRAFANA_ADMIN_PASSWORD": "grafana-test-password", "REDIS_PASSWORD": "redis-test-password"}

INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: object, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ substitution (enough for this file)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, word = match.groups()
        if env.get(name):
            return env[name]
        if operator and operator.endswith("?"):
            raise AssertionError(f"compose would refuse to start without {name}: {word}")
        return word or ""

    return INTERPOLATION.sub(substitute, str(value))


def container_environment(service: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment as the container sees it, after interpolation from REQUIRED_ENV and `env`."""
    environment = load_compose()["services"][service].get("environment", {})
    assert isinstance(environment, dict), f"{service}: use the mapping form of environment"
    return {key: interpolate(value, {**REQUIRED_ENV, **(env or {})}) for key, value in environment.items()}


def run_with_python(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a `python ...` health-check command with this interpreter (the images have the same packages)."""
    assert command[0] == "python", command
    return subprocess.run(
        [sys.executable, *command[1:]], env=env, capture_output=True, text=True, timeout=30, check=False
    )


# --- docker-compose.yml ---------------------------------------------------------------------------


def test_compose_has_the_services() -> None:
    services = load_compose()["services"]
    assert {"redis", "api", "worker", "prometheus", "grafana", "minio"} <= set(services)
    assert services["redis"]["image"].startswith("redis:7")
    assert "minio/minio" in services["minio"]["image"]


def test_redis_persists_and_never_evicts() -> None:
    command = load_compose()["services"]["redis"]["command"]
    text = " ".join(command) if isinstance(command, list) else command
    for setting in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert setting in text, f"redis command lacks {setting!r}: {text!r}"
    assert any(volume.endswith(":/data") for volume in load_compose()["services"]["redis"]["volumes"])


def test_every_service_has_a_healthcheck() -> None:
    for name, spec in load_compose()["services"].items():
        healthcheck = spec.get("healthcheck")
        assert healthcheck, f"{name} has no healthcheck"
        assert not healthcheck.get("disable"), f"{name}'s healthcheck is disabled"
        assert healthcheck.get("test") and healthcheck["test"][0] in ("CMD", "CMD-SHELL"), name


def test_worker_reserves_a_gpu_and_can_scale() -> None:
    worker = load_compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", []) for device in devices
    ), devices
    for key in ("container_name", "ports", "hostname"):
        assert key not in worker, f"worker sets {key}: `docker compose up --scale worker=N` would break"
    assert container_environment("worker")["DIT_DEVICE"] == "cuda"


def test_api_publishes_port_8000() -> None:
    api = load_compose()["services"]["api"]
    published = []
    for port in api["ports"]:
        if isinstance(port, dict):
            published.append((str(port.get("published")), str(port["target"])))
        else:
            parts = str(port).split(":")
            published.append((parts[-2], parts[-1]))
    assert ("8000", "8000") in published, api["ports"]
    environment = container_environment("api")
    assert environment["DIT_HOST"] == "0.0.0.0"
    assert environment["DIT_PORT"] == "8000"


@pytest.mark.parametrize("service", ["api", "worker"])
def test_api_and_worker_share_redis_and_outputs(service: str) -> None:
    compose = load_compose()
    spec = compose["services"][service]
    environment = container_environment(service)
    assert environment["REDIS_URL"] == f"redis://:{REQUIRED_ENV['REDIS_PASSWORD']}@redis:6379/0"
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    volume = f"outputs:{environment['DIT_OUTPUT_DIR']}"
    assert volume in spec["volumes"], f"{service} does not mount the shared outputs volume at DIT_OUTPUT_DIR"


def test_named_volumes_are_declared() -> None:
    compose = load_compose()
    declared = set(compose.get("volumes") or {})
    for name, spec in compose["services"].items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} uses volume {source!r}, not declared at the top level"


def test_minio_only_in_the_s3_profile() -> None:
    services = load_compose()["services"]
    assert services["minio"]["profiles"] == ["s3"]
    assert [name for name, spec in services.items() if spec.get("profiles")] == ["minio"]


@pytest.mark.parametrize("service", ["api", "worker"])
def test_build_paths_exist(service: str) -> None:
    build = load_compose()["services"][service]["build"]
    context = ROOT / build["context"]
    assert context.is_dir(), f"{service}: build context {build['context']!r} does not exist"
    dockerfile = context / build["dockerfile"]
    assert dockerfile.is_file(), f"{service}: dockerfile {build['dockerfile']!r} does not exist"
    assert dockerfile.resolve() == DOCKERFILES[service].resolve()


def test_compose_environment_gives_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The api's and worker's environments, with compose's defaults, are settings that load."""
    for key in list(os.environ):
        if key.startswith("DIT_") or key in ("REDIS_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key)
    for service in ("api", "worker"):
        with monkeypatch.context() as patch:
            for key, value in container_environment(service).items():
                patch.setenv(key, value)
            settings = get_settings()
            assert settings.redis_url == f"redis://:{REQUIRED_ENV['REDIS_PASSWORD']}@redis:6379/0"
            assert settings.storage is StorageBackend.LOCAL
            assert isinstance(storage_from_settings(settings), LocalStorage)
            if service == "worker":
                assert settings.device is Device.CUDA
                assert settings.models == []


def test_compose_environment_switches_to_minio(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented .env for the bundled MinIO gives both processes an S3 storage at http://minio:9000."""
    dotenv = {
        "DIT_STORAGE": "s3",
        "DIT_S3_ENDPOINT_URL": "http://minio:9000",
        "MINIO_ROOT_USER": "dit",
        "MINIO_ROOT_PASSWORD": "change-me-please",
        "AWS_ACCESS_KEY_ID": "dit",
        "AWS_SECRET_ACCESS_KEY": "change-me-please",
    }
    for service in ("api", "worker"):
        with monkeypatch.context() as patch:
            for key, value in container_environment(service, dotenv).items():
                patch.setenv(key, value)
            storage = storage_from_settings(get_settings())
            assert isinstance(storage, S3Storage)
            assert (storage.bucket, storage.endpoint_url) == ("dit-outputs", "http://minio:9000")
    minio = load_compose()["services"]["minio"]
    assert "local/${DIT_S3_BUCKET:-dit-outputs}" in " ".join(minio["healthcheck"]["test"])


def _compose_validator() -> list[str]:
    """`docker compose` (the plugin) or Debian's `docker-compose` (v1.29): both check the file against
    the compose schema client-side, with no engine."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return [docker, "compose"]
    if v1 := shutil.which("docker-compose"):
        return [v1]
    message = "no compose CLI: neither `docker compose` nor `docker-compose` (apt-get install docker-compose)"
    if os.environ.get("DIT_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def compose_config(
    env: dict[str, str], tmp_path: Path, *extra: str, file: Path = COMPOSE_FILE
) -> subprocess.CompletedProcess[str]:
    """`compose config -q` with only `env` (and PATH) set: a clean environment, and an empty --env-file
    so that a developer's own `.env` next to the compose file cannot stand in for a missing variable."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    return subprocess.run(
        [*_compose_validator(), "-f", str(file), "--env-file", str(env_file), *extra, "config", "-q"],
        cwd=file.parent,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_docker_compose_config_is_valid(tmp_path: Path) -> None:
    """`config -q` validates the file against the compose schema (with and without the s3 profile)."""
    for extra in ([], ["--profile", "s3"]):
        result = compose_config(REQUIRED_ENV, tmp_path, *extra)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", REQUIRED_ENV)
def test_docker_compose_config_refuses_a_missing_secret(missing: str, tmp_path: Path) -> None:
    """No password, no stack: compose fails, and its message names the variable to set."""
    env = {name: value for name, value in REQUIRED_ENV.items() if name != missing}
    for extra in ([], ["--profile", "s3"]):
        result = compose_config(env, tmp_path, *extra)
        assert result.returncode != 0, f"compose accepts a stack without {missing}"
        assert f"set {missing}" in result.stderr + result.stdout, result.stderr
    empty = compose_config({}, tmp_path)
    assert empty.returncode != 0 and "PASSWORD" in empty.stderr + empty.stdout, empty.stderr


def test_the_compose_validator_catches_a_misspelt_key(tmp_path: Path) -> None:
    """The check above can fail: a misspelt option is refused."""
    bad = load_compose()
    bad["services"]["api"]["helthcheck"] = bad["services"]["api"].pop("healthcheck")
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(bad))
    result = compose_config(REQUIRED_ENV, tmp_path, file=tmp_path / "docker-compose.yml")
    assert result.returncode != 0 and "helthcheck" in result.stderr + result.stdout


# --- hardening ------------------------------------------------------------------------------------

# Services allowed a writable root file system, each with the reason (docker-compose.yml says it too).
WRITABLE_ROOT = {
    "minio": "the server creates ~/.minio/certs and the health check's mc ~/.mc; not tried read-only",
}
# Services that may publish a port on every interface; the rest publish on 127.0.0.1 only.
PUBLIC_PORTS = {"api"}
MINIO_CREDENTIALS = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")


def _on_path(tmp_path: Path, name: str, script: str) -> dict[str, str]:
    """An environment whose PATH finds the shell script `name` (in tmp_path/bin) first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + script)
    (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("service", sorted(load_compose()["services"]))
def test_service_drops_capabilities_and_privilege_gain(service: str) -> None:
    spec = load_compose()["services"][service]
    assert spec.get("cap_drop") == ["ALL"], f"{service} keeps Linux capabilities"
    assert "no-new-privileges:true" in spec.get("security_opt", []), f"{service} may gain privileges"
    assert not spec.get("cap_add"), f"{service} adds capabilities back: say why, and test it"
    assert not spec.get("privileged"), f"{service} is privileged"


@pytest.mark.parametrize("service", sorted(load_compose()["services"]))
def test_service_root_file_system_is_read_only(service: str) -> None:
    spec = load_compose()["services"][service]
    if service in WRITABLE_ROOT:
        assert not spec.get("read_only"), f"{service} is read-only now: drop it from WRITABLE_ROOT"
    else:
        assert spec.get("read_only") is True, f"{service} has a writable root file system"
    for mount in spec.get("tmpfs", []):
        assert str(mount).startswith("/"), f"{service}: tmpfs {mount!r}"
    assert set(WRITABLE_ROOT) <= set(load_compose()["services"])


@pytest.mark.parametrize("service", sorted(load_compose()["services"]))
def test_only_the_api_publishes_beyond_this_host(service: str) -> None:
    if service in PUBLIC_PORTS:
        return
    for port in load_compose()["services"][service].get("ports", []):
        published = interpolate(port, REQUIRED_ENV)
        assert published.startswith("127.0.0.1:"), f"{service} publishes {published!r} on every interface"


def test_grafana_needs_a_password_and_listens_on_this_host() -> None:
    grafana = load_compose()["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert (
        container_environment("grafana")["GF_SECURITY_ADMIN_PASSWORD"]
        == REQUIRED_ENV["GRAFANA_ADMIN_PASSWORD"]
    )
    assert [interpolate(port, REQUIRED_ENV) for port in grafana["ports"]] == ["127.0.0.1:3000:3000"]


def test_every_redis_url_carries_the_password() -> None:
    text = COMPOSE_FILE.read_text()
    urls = re.findall(r"redis://\S*", text)
    assert urls, "no REDIS_URL in docker-compose.yml"
    for url in urls:
        assert url.startswith("redis://:${REDIS_PASSWORD:?"), f"{url} does not authenticate"
    for service in ("api", "worker"):
        parsed = parse_url(container_environment(service)["REDIS_URL"])
        assert parsed["password"] == REQUIRED_ENV["REDIS_PASSWORD"], service
    # The images' health checks take REDIS_URL from the environment (compose's, with the password).
    for dockerfile in DOCKERFILES.values():
        assert "redis://" not in " ".join(of(dockerfile, "HEALTHCHECK") + of(dockerfile, "ENV"))
    assert "os.environ['REDIS_URL']" in " ".join(dockerfile_healthcheck(WORKER_DOCKERFILE))


def test_redis_requires_the_password_and_caps_its_memory() -> None:
    command = load_compose()["services"]["redis"]["command"]
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert re.fullmatch(r"\$\{REDIS_MAXMEMORY:-\d+[kmg]b\}", command[command.index("--maxmemory") + 1])
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


@pytest.mark.slow  # starts a real redis-server and waits for it
def test_redis_and_its_health_check_with_the_password(tmp_path: Path) -> None:
    """Redis started with compose's command (on a free port) refuses clients without the password, and
    the health check passes with the service's REDISCLI_AUTH only."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (server and cli):
        pytest.fail("redis-server and redis-cli are needed (apt-get install redis-server)")
    spec = load_compose()["services"]["redis"]
    command = [interpolate(part, REQUIRED_ENV) for part in spec["command"]]
    assert command[0] == "redis-server"
    port = free_port()
    process = subprocess.Popen(
        [server, *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = container_environment("api")["REDIS_URL"].replace("@redis:6379", f"@127.0.0.1:{port}")
        client = Redis.from_url(url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis_exceptions.ConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, "redis did not start"
                time.sleep(0.05)
        assert int(client.config_get("maxmemory")["maxmemory"]) == 1024**3
        with pytest.raises(redis_exceptions.AuthenticationError):
            Redis(host="127.0.0.1", port=port).ping()

        test = spec["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        env = {**os.environ, **_on_path(tmp_path, "redis-cli", f'exec {cli} -p {port} "$@"\n')}
        env.pop("REDISCLI_AUTH", None)

        def healthy(extra: dict[str, str]) -> bool:
            run = subprocess.run(["sh", "-c", test[1]], env={**env, **extra}, timeout=10, check=False)
            return run.returncode == 0

        assert healthy(container_environment("redis"))
        assert not healthy({}), "healthy without the password"
        assert not healthy({"REDISCLI_AUTH": "wrong"}), "healthy with a wrong password"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_prometheus_has_no_lifecycle_or_admin_api() -> None:
    command = " ".join(load_compose()["services"]["prometheus"]["command"])
    assert "--web.enable-lifecycle" not in command
    assert "--web.enable-admin-api" not in command


def test_minio_has_no_default_credentials(tmp_path: Path) -> None:
    """The entrypoint refuses to start MinIO without both credentials (MinIO itself would fall back to
    minioadmin/minioadmin), and starts it with them."""
    assert "minioadmin" not in yaml.safe_dump(load_compose()), "MinIO's default credentials"
    minio = load_compose()["services"]["minio"]
    for name in MINIO_CREDENTIALS:
        assert container_environment("minio")[name] == "", f"{name} has a default"
    entrypoint = [interpolate(part, REQUIRED_ENV) for part in minio["entrypoint"]]
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    env = {**os.environ, **_on_path(tmp_path, "minio", 'echo "started $*"\n')}

    def start(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        command = ["sh", *entrypoint[1:], *minio["command"]]
        return subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, check=False)

    credentials = {"MINIO_ROOT_USER": "dit", "MINIO_ROOT_PASSWORD": "change-me-please"}
    for missing in [*MINIO_CREDENTIALS, None]:
        result = start(
            {name: value for name, value in credentials.items() if name != missing} if missing else {}
        )
        assert result.returncode != 0 and "started" not in result.stdout, f"started without {missing}"
        assert all(name in result.stderr for name in MINIO_CREDENTIALS), result.stderr
    result = start(credentials)
    assert result.returncode == 0 and result.stdout.strip() == "started " + " ".join(minio["command"])


def test_the_deployment_docs_name_the_required_variables() -> None:
    for doc in (ROOT / "docs" / "deployment.md", ROOT / "docker" / "README.md"):
        text = doc.read_text()
        for name in [*REQUIRED_ENV, *MINIO_CREDENTIALS, "REDIS_MAXMEMORY"]:
            assert name in text, f"{doc.name} does not mention {name}"


# --- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES.values(), ids=DOCKERFILES.keys())
def test_dockerfile_runs_as_a_non_root_user(dockerfile: Path) -> None:
    users = of(dockerfile, "USER")
    assert users, f"{dockerfile.name} has no USER line"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name} runs as {users[-1]!r}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES.values(), ids=DOCKERFILES.keys())
def test_dockerfile_has_a_healthcheck(dockerfile: Path) -> None:
    command = dockerfile_healthcheck(dockerfile)
    assert command[:2] == ["python", "-c"], command


@pytest.mark.parametrize("dockerfile", DOCKERFILES.values(), ids=DOCKERFILES.keys())
def test_dockerfile_copies_existing_paths(dockerfile: Path) -> None:
    for args in of(dockerfile, "COPY") + of(dockerfile, "ADD"):
        words = args.split()
        if any(word.startswith("--from") for word in words):
            continue  # from another stage, not the build context
        sources = [word for word in words if not word.startswith("--")][:-1]
        assert sources, f"{dockerfile.name}: COPY {args!r} has no source"
        matched = 0
        for source in sources:
            if glob.has_magic(source):
                matched += len(glob.glob(str(ROOT / source)))
            else:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY source {source!r} does not exist"
                matched += 1
        assert matched, f"{dockerfile.name}: COPY {args!r} matches nothing"


@pytest.mark.parametrize("dockerfile", DOCKERFILES.values(), ids=DOCKERFILES.keys())
def test_dockerfile_copies_every_package(dockerfile: Path) -> None:
    """Each package that pyproject's setuptools find includes is copied before `pip install .`."""
    copied = {Path(args.split()[0]).name for args in of(dockerfile, "COPY") if not args.startswith("--")}
    packages = {
        pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= copied, f"{dockerfile.name} does not copy {sorted(packages - copied)}"
    assert "pyproject.toml" in copied


@pytest.mark.parametrize(("name", "dockerfile"), DOCKERFILES.items())
def test_dockerfile_command(name: str, dockerfile: Path) -> None:
    assert exec_form(of(dockerfile, "CMD")[-1], dockerfile) == ["dit-serve", name]


def test_api_dockerfile_has_no_gpu_stack() -> None:
    text = API_DOCKERFILE.read_text().lower()
    for word in ("torch", "cuda", "nvidia"):
        assert word not in text, f"api.Dockerfile mentions {word!r}"
    runs = of(API_DOCKERFILE, "RUN")
    assert any("pip install" in run for run in runs)
    assert not any("[worker]" in run or "'worker'" in run for run in runs), (
        "the API installs the worker extra"
    )
    assert all(image.startswith("python:3.11-slim") for image in base_images(API_DOCKERFILE))


def test_api_dockerfile_listens_on_all_interfaces() -> None:
    env = " ".join(of(API_DOCKERFILE, "ENV"))
    assert "DIT_HOST=0.0.0.0" in env
    assert "8000" in of(API_DOCKERFILE, "EXPOSE")


def test_worker_dockerfile_has_cuda_and_the_worker_extra() -> None:
    images = base_images(WORKER_DOCKERFILE)
    assert "cuda" in images[-1].lower(), images
    installs = [run for run in of(WORKER_DOCKERFILE, "RUN") if "pip install" in run]
    assert any("['worker']" in run or "[worker]" in run for run in installs), installs
    assert of(WORKER_DOCKERFILE, "VOLUME"), "the worker image declares no data volume"


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in (".venv", "data", ".git", "tests"):
        assert required in patterns, f".dockerignore lacks {required!r}"
    for needed in ("pyproject.toml", "app", "worker", "models", "dit_serve", "docker/api.Dockerfile"):
        assert not any(fnmatch.fnmatch(needed, pattern) for pattern in patterns), f"{needed} is ignored"


# --- the health checks, run for real ---------------------------------------------------------------


def test_app_imports_without_torch() -> None:
    code = "import app.main, sys; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


WORKER_HEALTHCHECKS = {
    "dockerfile": lambda: dockerfile_healthcheck(WORKER_DOCKERFILE),
    "compose": lambda: compose_healthcheck("worker"),
}


@pytest.mark.parametrize("where", WORKER_HEALTHCHECKS)
@pytest.mark.slow
def test_worker_healthcheck_sees_only_its_own_registration(where: str, redis: Redis, redis_url: str) -> None:
    command = WORKER_HEALTHCHECKS[where]()
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("DIT_WORKER_NAME", None)
    host = socket.gethostname()

    assert run_with_python(command, env).returncode == 1, "healthy with no worker registered"
    publish_worker(redis, f"other-{host}.1.abcdef", [], ttl_s=30)
    assert run_with_python(command, env).returncode == 1, "healthy on another container's registration"
    redis.zadd(WORKERS_KEY, {f"{host}.2.abcdef": time.time() - 1})
    assert run_with_python(command, env).returncode == 1, "healthy on an expired registration"
    publish_worker(redis, f"{host}.3.abcdef", [], ttl_s=30)
    result = run_with_python(command, env)
    assert result.returncode == 0, result.stderr
    assert run_with_python(command, {**env, "DIT_WORKER_NAME": "named"}).returncode == 1
    publish_worker(redis, "named", [], ttl_s=30)
    assert run_with_python(command, {**env, "DIT_WORKER_NAME": "named"}).returncode == 0
    assert (
        run_with_python(command, {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}).returncode != 0
    )


def _wait_for_healthz(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + API_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the API exited during start-up"
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise AssertionError(f"the API did not answer {url} within {API_START_TIMEOUT_S} s")


@pytest.mark.slow
def test_api_healthchecks_against_a_real_api(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DIT_HOST": "127.0.0.1",
        "DIT_PORT": str(port),
        "DIT_DATA_DIR": str(tmp_path / "data"),
        "DIT_OUTPUT_DIR": str(tmp_path / "outputs"),
    }
    commands = [dockerfile_healthcheck(API_DOCKERFILE), compose_healthcheck("api")]
    for command in commands:
        assert run_with_python(command, env).returncode != 0, "healthy with no API listening"
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        api = subprocess.Popen([sys.executable, "-m", "cli", "api"], env=env, stdout=out, stderr=out)
    try:
        _wait_for_healthz(f"http://127.0.0.1:{port}/healthz", api)
        for command in commands:
            result = run_with_python(command, env)
            assert result.returncode == 0, result.stderr
    finally:
        api.terminate()
        api.wait(timeout=20)


@pytest.mark.slow
def test_worker_healthcheck_against_a_real_worker(service: Any) -> None:
    """A real `dit-serve worker` on this host (the conftest service) passes its image's health check."""
    env = {**os.environ, "REDIS_URL": service.redis_url}
    env.pop("DIT_WORKER_NAME", None)
    for command in (dockerfile_healthcheck(WORKER_DOCKERFILE), compose_healthcheck("worker")):
        result = run_with_python(command, env)
        assert result.returncode == 0, result.stderr
