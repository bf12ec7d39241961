"""The production deployment (infra/): compose file, .env.example, images, Postgres init script.

Docker is not available to the tests, so they read the files: the compose file is parsed and interpolated with
infra/.env.example the way `docker compose --env-file infra/.env.example` would, and every cross-reference is
checked (services, ports, URLs, variables, configuration keys through the project's own loader). The Postgres init
script and the MinIO bootstrap are shell scripts; the latter is run with a stand-in `mc` that records its calls.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from deeprubin.config import ConfigError, env_overrides, load_params

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"

REQUIRED_SERVICES = {"postgres", "minio", "minio-init", "prefect-server", "mlflow", "dask-scheduler", "dask-worker",
                     "deploy-flows", "prefect-worker"}
PROJECT_SERVICES = {"dask-scheduler", "dask-worker", "deploy-flows", "prefect-worker"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}, $VAR; `$$` is a literal `$`.
_TOKEN = re.compile(r"\$\$|\$\{(?P<braced>[^}]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>.*))?$", re.DOTALL)


# ---------------------------------------------------------------------------------------------------------------
# Reading the files the way compose does.

def parse_env_file(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert "=" in line, f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        key, value = line.split("=", 1)
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}:{number}: bad name {key!r}"
        pairs.append((key, value))
    return pairs


def walk_strings(node: Any):
    """Every string of a parsed YAML tree, keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from walk_strings(key)
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)


def references(text: str) -> list[tuple[str, str | None, str]]:
    """(name, operator, argument) of each variable a string interpolates."""
    out = []
    for m in _TOKEN.finditer(text):
        if m.group(0) == "$$":
            continue
        if m.group("bare"):
            out.append((m.group("bare"), None, ""))
            continue
        inner = _BRACED.match(m.group("braced"))
        assert inner, f"cannot parse ${{{m.group('braced')}}} in {text!r}"
        assert "$" not in (inner.group("arg") or ""), f"nested interpolation is not used here: {text!r}"
        out.append((inner.group("name"), inner.group("op"), inner.group("arg") or ""))
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("bare"):
            return env.get(m.group("bare"), "")
        inner = _BRACED.match(m.group("braced"))
        name, op, arg = inner.group("name"), inner.group("op"), inner.group("arg") or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise AssertionError(f"compose would refuse to start: {name}: {arg}")
        return value or ""

    return _TOKEN.sub(one, text)


def resolve(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {resolve(k, env): resolve(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    return node


def tokens(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def option(args: list[str], name: str) -> str:
    """The value of ``--name value`` or ``--name=value``; fails when the option is absent or repeated."""
    found = [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
    found += [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    assert len(found) == 1, f"{name} given {len(found)} times in {args}"
    return found[0]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def published(service: dict) -> set[tuple[int, int]]:
    """(host port, container port) pairs of a service's published ports, short or long syntax."""
    out = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.add((int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        assert len(parts) in (2, 3), f"publish the host port explicitly: {port!r}"
        out.add((int(parts[-2]), int(parts[-1])))
    return out


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def constraint(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    assert not current, f"{path.name} ends in a continuation line"
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
    return out


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def example() -> dict[str, str]:
    return dict(parse_env_file(ENV_EXAMPLE))


@pytest.fixture(scope="module")
def compose(raw, example) -> dict:
    """The compose file as `docker compose --env-file infra/.env.example` sees it (values interpolated)."""
    return resolve(raw, example)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


# ---------------------------------------------------------------------------------------------------------------
# Services and ports.

def test_compose_defines_every_service(raw):
    assert REQUIRED_SERVICES <= set(raw["services"]), REQUIRED_SERVICES - set(raw["services"])


def test_published_ports(services):
    assert published(services["prefect-server"]) == {(4200, 4200)}
    assert published(services["mlflow"]) == {(5000, 5000)}
    assert published(services["minio"]) == {(9000, 9000), (9001, 9001)}
    assert published(services["dask-scheduler"]) == {(8786, 8786), (8787, 8787)}
    # The databases and the workers are reached inside the compose network only.
    for name in ("postgres", "dask-worker", "prefect-worker", "minio-init", "deploy-flows"):
        assert not published(services[name]), name


def test_published_ports_are_where_the_servers_listen(services):
    prefect = tokens(services["prefect-server"]["command"])
    mlflow = tokens(services["mlflow"]["command"])
    dask = tokens(services["dask-scheduler"]["command"])
    minio = tokens(services["minio"]["command"])
    assert int(option(prefect, "--port")) == 4200
    assert int(option(mlflow, "--port")) == 5000
    assert int(option(dask, "--port")) == 8786
    assert int(option(dask, "--dashboard-address").rsplit(":", 1)[1]) == 8787
    assert int(option(minio, "--address").rsplit(":", 1)[1]) == 9000
    assert int(option(minio, "--console-address").rsplit(":", 1)[1]) == 9001
    # Servers in containers listen on every interface, or the published ports lead nowhere.
    assert option(prefect, "--host") == "0.0.0.0"
    assert option(mlflow, "--host") == "0.0.0.0"


def test_published_ports_bind_to_the_configured_address(raw, example):
    assert example["BIND_ADDRESS"] == "127.0.0.1"  # safe default: the UIs have no authentication
    for name, service in raw["services"].items():
        for port in service.get("ports") or []:
            assert str(port).startswith("${BIND_ADDRESS"), f"{name}: {port} ignores BIND_ADDRESS"


# ---------------------------------------------------------------------------------------------------------------
# Prefect and MLflow servers.

def test_prefect_server(services, raw):
    server = services["prefect-server"]
    # The server is the client's version (constraints.txt): Prefect does not support a client newer than its server.
    assert server["image"] == f"prefecthq/prefect:{constraint('prefect')}-python3.11"
    assert tokens(server["command"])[:3] == ["prefect", "server", "start"]
    env = environment(server)
    url = urlsplit(env["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.port, url.path, url.username) == ("postgres", 5432, "/prefect", "prefect")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert urlsplit(env["PREFECT_UI_API_URL"]).path == "/api"
    assert "/api/health" in " ".join(tokens(raw["services"]["prefect-server"]["healthcheck"]["test"]))


def test_mlflow_server(services, example):
    server = services["mlflow"]
    args = tokens(server["command"])
    assert args[:2] == ["mlflow", "server"]
    assert option(args, "--workers") == "1"
    backend = urlsplit(option(args, "--backend-store-uri"))
    assert backend.scheme in ("postgresql", "postgresql+psycopg2")
    assert (backend.hostname, backend.port, backend.path, backend.username) == ("postgres", 5432, "/mlflow", "mlflow")
    assert backend.password == example["MLFLOW_DB_PASSWORD"]
    assert option(args, "--artifacts-destination") == f"s3://{example['MLFLOW_BUCKET']}/"
    assert "--no-serve-artifacts" not in args  # clients reach artifacts through the server (mlflow-artifacts:/)
    env = environment(server)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] == example["S3_ACCESS_KEY_ID"]
    assert env["AWS_SECRET_ACCESS_KEY"] == example["S3_SECRET_ACCESS_KEY"]
    assert "/health" in " ".join(tokens(server["healthcheck"]["test"]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mlflow_accepts_the_host_header_the_worker_sends(services):
    # MLflow rejects Host headers outside its allowed list (DNS-rebinding protection); by default that is localhost
    # and private IPs, so http://mlflow:5000 from the worker would get 403 unless the list names it.
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    allowed_env = environment(services["mlflow"]).get("MLFLOW_SERVER_ALLOWED_HOSTS", "")
    args = tokens(services["mlflow"]["command"])
    allowed_flag = option(args, "--allowed-hosts") if "--allowed-hosts" in " ".join(args) else ""
    allowed = [h.strip() for h in (allowed_flag or allowed_env).split(",") if h.strip()] or get_default_allowed_hosts()
    for name in ("prefect-worker", "deploy-flows"):
        host = urlsplit(environment(services[name])["MLFLOW_TRACKING_URI"]).netloc
        assert is_allowed_host_header(allowed, host), f"{name} calls MLflow as {host}; allowed: {allowed}"
    assert is_allowed_host_header(allowed, "localhost:5000")  # the published port, from this host
    assert not is_allowed_host_header(allowed, "evil.example.com")


def test_mlflow_image_matches_the_client_and_has_the_drivers(services):
    assert services["mlflow"]["image"] == f"deeprubin-mlflow:{constraint('mlflow')}"
    instructions = dockerfile_instructions(INFRA / "mlflow.Dockerfile")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in instructions if i == "ARG" and "=" in a}
    assert args["MLFLOW_VERSION"] == constraint("mlflow")
    assert ("FROM", "ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}") in instructions
    installed = " ".join(a for i, a in instructions if i == "RUN" and "pip install" in a).split()
    assert {"psycopg2-binary", "boto3"} <= set(installed)


# ---------------------------------------------------------------------------------------------------------------
# Variables: the compose file against .env.example.

def test_env_example_has_no_duplicate_keys():
    keys = [key for key, _ in parse_env_file(ENV_EXAMPLE)]
    assert len(keys) == len(set(keys)), sorted({k for k in keys if keys.count(k) > 1})


def test_every_compose_variable_is_in_env_example(raw, example):
    used = {name for text in walk_strings(raw) for name, _, _ in references(text)}
    assert used, "the compose file interpolates nothing?"
    assert {"POSTGRES_PASSWORD", "MLFLOW_BUCKET", "DVC_BUCKET", "PREFECT_WORK_POOL", "DASK_WORKERS",
            "ALERCE_BASE_URL"} <= used
    assert not used - set(example), f"used in docker-compose.yml, missing from .env.example: {used - set(example)}"
    unused = set(example) - used
    assert not unused, f"in .env.example but used nowhere in docker-compose.yml: {unused}"


def test_secrets_are_required_and_placeholders_say_change_me(raw, example):
    secrets = {k for k in example if re.search(r"PASSWORD|SECRET", k)}
    assert {"POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "MINIO_ROOT_PASSWORD",
            "S3_SECRET_ACCESS_KEY"} <= secrets
    for key in secrets:
        assert "CHANGE_ME" in example[key], f"{key}: the example value must be an obvious placeholder"
    refs = [(name, op) for text in walk_strings(raw) for name, op, _ in references(text)]
    for key in secrets:
        ops = {op for name, op in refs if name == key}
        # The first use of a secret in a string may carry the check; every use must at least not default it.
        assert ":?" in ops, f"{key} is never required with ${{{key}:?...}}"
        assert not ops & {":-", "-"}, f"{key} has a default value"


def test_compose_refuses_to_start_without_a_secret(raw, example):
    without = {k: v for k, v in example.items() if k != "MLFLOW_DB_PASSWORD"}
    with pytest.raises(AssertionError, match="MLFLOW_DB_PASSWORD"):
        resolve(raw, without)


# ---------------------------------------------------------------------------------------------------------------
# The environment the project's code reads.

def test_worker_environment_points_at_the_services(services, example):
    env = environment(services["prefect-worker"])
    api = urlsplit(env["PREFECT_API_URL"])
    assert (api.scheme, api.hostname, api.path) == ("http", "prefect-server", "/api")
    assert api.port == int(option(tokens(services["prefect-server"]["command"]), "--port"))
    tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
    assert (tracking.scheme, tracking.hostname) == ("http", "mlflow")
    assert tracking.port == int(option(tokens(services["mlflow"]["command"]), "--port"))
    dask = urlsplit(env["DEEPRUBIN_PREPROCESS__DASK_ADDRESS"])
    assert (dask.scheme, dask.hostname) == ("tcp", "dask-scheduler")
    assert dask.port == int(option(tokens(services["dask-scheduler"]["command"]), "--port"))
    minio_port = int(option(tokens(services["minio"]["command"]), "--address").rsplit(":", 1)[1])
    for key in ("MLFLOW_S3_ENDPOINT_URL", "DVC_REMOTE_ENDPOINT_URL"):
        assert env[key] == f"http://minio:{minio_port}", key
    assert env["DVC_REMOTE_URL"] == f"s3://{example['DVC_BUCKET']}/"
    assert env["AWS_ACCESS_KEY_ID"] == example["S3_ACCESS_KEY_ID"]
    assert env["AWS_SECRET_ACCESS_KEY"] == example["S3_SECRET_ACCESS_KEY"]
    assert env["DEEPRUBIN_INGEST__SOURCE"] == "alerce"
    assert env["DEEPRUBIN_INGEST__ALERCE__BASE_URL"] == example["ALERCE_BASE_URL"]
    assert env["DEEPRUBIN_PREPROCESS__EXECUTOR"] == "dask"
    # The workers connect to the address the flows hand to Dask.
    assert tokens(services["dask-worker"]["command"])[2] == env["DEEPRUBIN_PREPROCESS__DASK_ADDRESS"]


def test_deploy_flows_sees_the_workers_environment(services):
    # Deployments are registered with the same configuration the flow runs resolve (schedules come from params).
    assert environment(services["deploy-flows"]) == environment(services["prefect-worker"])


@pytest.mark.parametrize("name", sorted(PROJECT_SERVICES | {"prefect-server", "mlflow"}))
def test_telemetry_is_off(services, name):
    env = environment(services[name])
    expected = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                "DVC_NO_ANALYTICS": "1"}
    assert {k: env.get(k) for k in expected} == expected


def _deeprubin_variables(services) -> dict[str, str]:
    found: dict[str, str] = {}
    for service in services.values():
        for key, value in environment(service).items():
            if key.startswith("DEEPRUBIN_"):
                assert found.setdefault(key, value) == value, f"{key} differs between services"
    return found


def _attribute(params, dotted: str):
    node = params
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_every_deeprubin_variable_is_a_configuration_key(services, monkeypatch):
    variables = _deeprubin_variables(services)
    assert {"DEEPRUBIN_INGEST__SOURCE", "DEEPRUBIN_INGEST__ALERCE__BASE_URL", "DEEPRUBIN_PREPROCESS__EXECUTOR",
            "DEEPRUBIN_PREPROCESS__DASK_ADDRESS"} <= set(variables)
    for key, value in sorted(variables.items()):
        monkeypatch.setenv(key, value)
        try:
            params = load_params(None)  # an unknown key or a bad value is a ConfigError naming it
        except ConfigError as exc:
            pytest.fail(f"{key}={value}: {exc}")
        ((dotted, parsed),) = env_overrides({key: value})
        assert _attribute(params, dotted) == parsed == yaml.safe_load(value), key
        monkeypatch.delenv(key)


def test_a_misspelt_key_would_be_caught(monkeypatch):
    # The check above relies on the loader rejecting unknown keys: a typo in the compose file must fail there.
    monkeypatch.setenv("DEEPRUBIN_PREPROCESS__DASK_ADRESS", "tcp://dask-scheduler:8786")
    with pytest.raises(ConfigError, match=r"preprocess\.dask_adress: unknown key"):
        load_params(None)


def test_worker_configuration_resolves_to_the_stack(services, monkeypatch):
    """params.yaml under the worker's environment: every stage is pointed at the servers, by environment alone."""
    for key, value in environment(services["prefect-worker"]).items():
        monkeypatch.setenv(key, value)
    params = load_params(REPO / "params.yaml")
    assert params.ingest.source == "alerce"
    assert params.ingest.upsert  # nightly pulls are incremental
    assert params.ingest.alerce.base_url == "https://api.alerce.online"
    assert params.preprocess.executor == "dask"
    assert params.preprocess.dask_address == "tcp://dask-scheduler:8786"
    assert params.train.tracking_uri == "http://mlflow:5000"  # train.tracking_uri: null -> $MLFLOW_TRACKING_URI


# ---------------------------------------------------------------------------------------------------------------
# Start order.

def test_depends_on_targets_and_conditions(raw, services):
    valid = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in raw["services"].items():
        for target, condition in depends_on(service).items():
            assert target in raw["services"], f"{name} depends on undefined {target}"
            assert condition in valid, f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in raw["services"][target], f"{name} waits for {target}'s health: it has none"


def _mentions(service: dict, needle: str) -> bool:
    return any(needle in s for s in walk_strings({k: v for k, v in service.items() if k != "depends_on"}))


def test_services_wait_for_what_they_use(services):
    waits = {
        "@postgres:": {"postgres": {"service_healthy"}},
        "minio:9000": {"minio": {"service_healthy"}, "minio-init": {"service_completed_successfully"}},
        "prefect-server:": {"prefect-server": {"service_healthy"}},
        "mlflow:5000": {"mlflow": {"service_healthy"}},
        "dask-scheduler:": {"dask-scheduler": {"service_healthy"}},
    }
    checked = 0
    for name, service in services.items():
        deps = depends_on(service)
        for needle, options in waits.items():
            if name in options or not _mentions(service, needle):
                continue
            checked += 1
            assert any(deps.get(target) in conditions for target, conditions in options.items()), \
                f"{name} uses {needle.strip('@:')} without waiting for it ({deps})"
    assert checked >= 10
    # The buckets exist before anything writes to them.
    assert depends_on(services["mlflow"])["minio-init"] == "service_completed_successfully"
    assert depends_on(services["prefect-worker"])["minio-init"] == "service_completed_successfully"
    assert depends_on(services["minio-init"]) == {"minio": "service_healthy"}


def test_no_dependency_cycle(raw):
    graph = {name: set(depends_on(s)) for name, s in raw["services"].items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join(path + (name,))
        if name not in done:
            for target in graph[name]:
                visit(target, path + (name,))
            done.add(name)

    for name in graph:
        visit(name, ())


# ---------------------------------------------------------------------------------------------------------------
# The project image, Dask, the Prefect worker and deployments.

def test_project_services_run_the_project_image(raw, services):
    for name in PROJECT_SERVICES:
        build = raw["services"][name]["build"]
        assert (build["context"], build["dockerfile"]) == ("..", "infra/Dockerfile"), name
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == INFRA / "Dockerfile"
    assert len({services[name]["image"] for name in PROJECT_SERVICES}) == 1


def test_every_build_points_at_an_existing_dockerfile(raw):
    for name, service in raw["services"].items():
        if "build" in service:
            build = service["build"]
            path = COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")
            assert path.is_file(), f"{name}: {path}"
    assert raw["services"]["mlflow"]["build"] == {"context": ".", "dockerfile": "mlflow.Dockerfile"}


def test_dask_services(services, example):
    assert tokens(services["dask-scheduler"]["command"])[:2] == ["dask", "scheduler"]
    worker = tokens(services["dask-worker"]["command"])
    assert worker[:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert (option(worker, "--nworkers"), option(worker, "--nthreads")) == ("1", "2")
    assert int(services["dask-worker"]["deploy"]["replicas"]) == int(example["DASK_WORKERS"])
    assert "container_name" not in services["dask-worker"]  # it is scaled


def test_prefect_worker_and_deployments_share_the_pool(raw, services, example):
    worker = tokens(services["prefect-worker"]["command"])
    assert worker[:3] == ["prefect", "worker", "start"]
    assert option(worker, "--type") == "process"
    deploy = tokens(services["deploy-flows"]["command"])
    assert deploy[:2] == ["deeprubin", "serve-flows"]
    assert option(deploy, "--work-pool") == option(worker, "--pool") == example["PREFECT_WORK_POOL"]
    assert str(raw["services"]["deploy-flows"]["restart"]) == "no"  # one-shot
    assert depends_on(services["prefect-worker"])["prefect-server"] == "service_healthy"


def test_the_cli_accepts_the_deploy_command():
    import typer.main

    from deeprubin.cli import app

    commands = typer.main.get_command(app).commands
    if "serve-flows" not in commands:
        pytest.skip("deeprubin serve-flows is not in the CLI yet")
    options = {opt for param in commands["serve-flows"].params for opt in param.opts}
    assert "--work-pool" in options


def test_volumes(raw):
    declared = set(raw.get("volumes") or {})
    for name, service in raw["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"

    def mounts(service: str) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in raw["services"][service]["volumes"]}

    assert mounts("postgres")["/var/lib/postgresql/data"] in declared
    assert mounts("minio")[tokens(raw["services"]["minio"]["command"])[1]] in declared
    worker = mounts("prefect-worker")
    assert {"/app/data", "/app/models"} <= set(worker)
    assert all(worker[target] in declared for target in ("/app/data", "/app/models"))


def test_project_dockerfile_installs_cpu_torch_first():
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("WORKDIR", "/app") in instructions
    runs = [(i, a) for i, (ins, a) in enumerate(instructions) if ins == "RUN"]
    torch = [i for i, a in runs if re.search(r"pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/"
                                             r"whl/cpu(\s|$)", a)]
    project = [i for i, a in runs if "pip install -c constraints.txt -e ." in a]
    assert len(torch) == 1 and len(project) == 1, instructions
    assert torch[0] < project[0], "torch must be installed before the project"
    # The pin is the project's own (pyproject and constraints agree).
    assert constraint("torch") == "2.13.0"
    assert '"torch==2.13.0"' in (REPO / "pyproject.toml").read_text()
    extras = instructions[project[0]][1].replace('"', "").split()
    assert {"dvc[s3]", "prefect-dask", "psycopg2-binary", "boto3"} <= set(extras)
    # Nothing before the project install may pull torch from PyPI (its default build is CUDA's).
    assert not any("torch" in a for i, a in runs if i < torch[0])
    copies = [i for i, (ins, _) in enumerate(instructions) if ins == "COPY"]
    assert copies and min(copies) < project[0] < max(copies)  # the package's files first, the rest after


def test_project_dockerfile_copies_every_package_before_installing_it():
    """An editable install maps only the packages present when it runs: each must be copied before it."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    packages = {}  # top-level package -> its folder in the repository
    for name in setuptools["packages"]:
        top = name.split(".")[0]
        packages[top] = package_dir.get(top) or f"{package_dir.get('', '.')}/{top}".removeprefix("./")
        assert (REPO / packages[top] / "__init__.py").exists(), packages[top]
    assert "deeprubin" in packages
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    install = next(i for i, (ins, a) in enumerate(instructions) if ins == "RUN" and "-e ." in a)
    copied = set()
    for ins, args in instructions[:install]:
        if ins == "COPY":
            copied |= {a.rstrip("/") for a in args.split()[:-1] if not a.startswith("--")}
    for name, path in packages.items():
        assert path in copied or path.split("/")[0] in copied, f"{path} ({name}) is copied after `pip install -e .`"


def test_build_context_excludes_local_state():
    rules = [line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert {".venv", "mlruns", "mlflow.db", "data/*", "infra/.env"} <= set(rules)
    assert ".git" not in rules  # DVC and MLflow's commit tags need the repository


# ---------------------------------------------------------------------------------------------------------------
# Postgres: the databases the URLs name are the ones the init script creates.

def test_postgres_creates_the_databases_the_servers_use(raw, example):
    postgres = raw["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in " ".join(tokens(postgres["healthcheck"]["test"]))
    mounted = {v.split(":")[1]: v.split(":")[0] for v in postgres["volumes"]}
    script_mount = next(t for t in mounted if t.startswith("/docker-entrypoint-initdb.d/"))
    script = (COMPOSE.parent / mounted[script_mount]).resolve()
    assert script == INFRA / "postgres" / "init-databases.sh"
    created = dict(re.findall(r'^deeprubin_create_database (\w+) "\$(\w+)"$', script.read_text(), re.MULTILINE))
    assert created == {"prefect": "PREFECT_DB_PASSWORD", "mlflow": "MLFLOW_DB_PASSWORD"}

    prefect_url = environment(raw["services"]["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_url = option(tokens(raw["services"]["mlflow"]["command"]), "--backend-store-uri")
    for url in (prefect_url, mlflow_url):
        parts = urlsplit(interpolate(url, example))
        user, database = parts.username, parts.path.lstrip("/")
        assert user == database and database in created, url
        # The password in the URL is the variable postgres hands the init script for that role.
        ((password_var, _, _),) = references(url)
        assert password_var == created[database]
        assert [n for n, _, _ in references(environment(postgres)[created[database]])] == [password_var]


def test_init_script_is_valid_shell():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    script = INFRA / "postgres" / "init-databases.sh"
    subprocess.run([bash, "-n", str(script)], check=True)
    assert "exit" not in re.sub(r"#.*", "", script.read_text())  # the entrypoint may source it


# ---------------------------------------------------------------------------------------------------------------
# MinIO bootstrap, run with a stand-in `mc`.

def test_minio_init_creates_the_buckets_and_the_application_user(raw, services, example, tmp_path):
    init = services["minio-init"]
    assert tokens(init["entrypoint"])[:2] == ["/bin/sh", "-ec"]
    (script,) = tokens(init["command"])
    log = tmp_path / "mc.log"
    mc = tmp_path / "bin" / "mc"
    mc.parent.mkdir()
    mc.write_text('#!/bin/sh\necho "$*" >> "$MC_LOG"\n'
                  'if [ "$1 $2 $3" = "admin user info" ]; then echo "PolicyName: deeprubin"; fi\n')
    mc.chmod(mc.stat().st_mode | stat.S_IXUSR)
    env = {**environment(init), "PATH": f"{mc.parent}{os.pathsep}{os.environ['PATH']}", "MC_LOG": str(log),
           "TMPDIR": str(tmp_path)}
    subprocess.run(["/bin/sh", "-ec", script], env=env, check=True, capture_output=True, text=True)
    calls = log.read_text().splitlines()
    mlflow_bucket, dvc_bucket = example["MLFLOW_BUCKET"], example["DVC_BUCKET"]
    assert f"mb --ignore-existing store/{mlflow_bucket}" in calls
    assert f"mb --ignore-existing store/{dvc_bucket}" in calls
    assert f"alias set store http://minio:9000 {example['MINIO_ROOT_USER']} {example['MINIO_ROOT_PASSWORD']}" in calls
    # The user MLflow and the worker authenticate as, with a policy on exactly the two buckets.
    assert f"admin user add store {example['S3_ACCESS_KEY_ID']} {example['S3_SECRET_ACCESS_KEY']}" in calls
    assert f"admin policy attach store deeprubin --user {example['S3_ACCESS_KEY_ID']}" in calls
    policy = json.loads((tmp_path / "deeprubin-policy.json").read_text())
    resources = {r for s in policy["Statement"] if "s3:*" in s["Action"] for r in s["Resource"]}
    assert resources == {f"arn:aws:s3:::{b}{suffix}" for b in (mlflow_bucket, dvc_bucket) for suffix in ("", "/*")}
    # The same credentials, from the same variables, everywhere.
    raw_env = environment(raw["services"]["minio-init"])
    for consumer in ("mlflow", "prefect-worker"):
        consumer_env = environment(raw["services"][consumer])
        assert references(consumer_env["AWS_ACCESS_KEY_ID"])[0][0] == references(raw_env["APP_ACCESS_KEY"])[0][0]
        assert references(consumer_env["AWS_SECRET_ACCESS_KEY"])[0][0] == references(raw_env["APP_SECRET_KEY"])[0][0]
