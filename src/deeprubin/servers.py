"""Local Prefect and MLflow servers as managed background processes (``deeprubin up`` / ``deeprubin down``).

Each server runs detached in its own session, logs to ``<state_dir>/logs/<name>.log`` and is recorded in
``<state_dir>/run/<name>.json``; the record is what ``stop``/``status`` and a later ``up`` use to find it again.
Clients are pointed at the servers by configuration alone: see :func:`client_env`. Without servers (no
PREFECT_API_URL), Prefect runs embedded, on an ephemeral API whose database :func:`use_embedded_prefect` keeps in the
project (``.prefect/``), not in the user-wide ``~/.prefect``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

PREFECT_PORT = 4200
MLFLOW_PORT = 5000
HOST = "127.0.0.1"
STATE_DIR = Path(".deeprubin")
NAMES = ("prefect", "mlflow")
EMBEDDED_PREFECT_DIR = Path(".prefect")  # per project: the embedded (ephemeral) Prefect API's database
_DATABASE_URL_VARS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")

# Telemetry off for every server we start: the machines this runs on are often offline, and it is not ours to send.
_QUIET_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
_TAIL_LINES = 20


class ServerError(RuntimeError):
    """A server could not be started (or found), with the reason and the end of its log."""


@dataclass(frozen=True)
class ServerSpec:
    """How to run one server and how clients reach it."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    url: str  # what clients use: PREFECT_API_URL or MLFLOW_TRACKING_URI
    health_url: str
    ui_url: str
    port: int
    host: str = HOST
    # Variables removed from the inherited environment, so a developer's client settings cannot redirect the server.
    unset_env: tuple[str, ...] = field(default=())
    # Directories start() creates first (sqlite will not create a database's parent directory).
    dirs: tuple[str, ...] = field(default=())


def _executable(name: str) -> str:
    """The console script next to the running interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise ServerError(f"cannot find the '{name}' executable (looked in {beside.parent} and on PATH)")


def prefect_spec(state_dir: Path | str = STATE_DIR, host: str = HOST, port: int = PREFECT_PORT) -> ServerSpec:
    """Prefect server (API + UI) with its home, and so its sqlite database, under ``<state_dir>/prefect``."""
    home = Path(state_dir).absolute() / "prefect"
    base = f"http://{host}:{port}"
    env = {
        **_QUIET_ENV,
        "PREFECT_HOME": str(home),
        # Prefect's default location, stated explicitly so a developer's profile or env cannot point elsewhere.
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{(home / 'prefect.db').as_posix()}",
        # The API URL the UI is given: Prefect derives it from its settings' host and port (4200), not from the
        # --host/--port it is started with, so on any other port the UI would call a server that is not there.
        "PREFECT_SERVER_UI_API_URL": f"{base}/api",
    }
    return ServerSpec(
        name="prefect",
        cmd=[_executable("prefect"), "server", "start", "--host", host, "--port", str(port)],
        env=env,
        url=f"{base}/api",
        health_url=f"{base}/api/health",
        ui_url=base,
        port=port,
        host=host,
        # A client-side API URL or profile would make the server's own services talk to another server.
        unset_env=("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"),
        dirs=(str(home),),
    )


def mlflow_spec(state_dir: Path | str = STATE_DIR, host: str = HOST, port: int = MLFLOW_PORT) -> ServerSpec:
    """MLflow tracking server: sqlite backend, proxied local artifact store, one uvicorn worker."""
    root = Path(state_dir).absolute() / "mlflow"
    cmd = [
        _executable("mlflow"), "server", "--host", host, "--port", str(port),
        "--backend-store-uri", f"sqlite:///{(root / 'mlflow.db').as_posix()}",
        "--artifacts-destination", str(root / "artifacts"),
        # One worker: the default (4) costs memory for nothing locally, and with one uvicorn does not run a
        # supervisor that would restart a crashing worker forever instead of exiting.
        "--workers", "1",
    ]
    env = {
        **_QUIET_ENV,
        # The default also spawns a huey job runner (~3 GB); local tracking needs none of it.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    base = f"http://{host}:{port}"
    return ServerSpec(name="mlflow", cmd=cmd, env=env, url=base, health_url=f"{base}/health", ui_url=base,
                      port=port, host=host, unset_env=("MLFLOW_TRACKING_URI",),
                      dirs=(str(root), str(root / "artifacts")))


def service_spec(params_path: Path | str, state_dir: Path | str = STATE_DIR, host: str = HOST, port: int = 8000,
                 overrides: Iterable[str] = ()) -> ServerSpec:
    """``deeprubin serve-api`` (the HTTP classification service) with the configuration ``params_path``."""
    base = f"http://{host}:{port}"
    cmd = [_executable("deeprubin"), "serve-api", "--params", str(Path(params_path).absolute()), "--host", host,
           "--port", str(port), *[a for o in overrides for a in ("--set", o)]]
    return ServerSpec(name="serve-api", cmd=cmd, env=dict(_QUIET_ENV), url=base, health_url=f"{base}/healthz",
                      ui_url=f"{base}/docs", port=port, host=host, dirs=(str(Path(state_dir).absolute()),))


_SPECS = {"prefect": prefect_spec, "mlflow": mlflow_spec}


# --- records -------------------------------------------------------------------------------------------------------

def _record_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / "run" / f"{name}.json"


def _log_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir).absolute() / "logs" / f"{name}.log"


def _read_record(state_dir: Path, name: str) -> dict | None:
    path = _record_path(state_dir, name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # A torn or hand-edited file tells us nothing reliable: treat it as stale.
        path.unlink(missing_ok=True)
        return None


def _write_record(state_dir: Path, record: dict) -> None:
    path = _record_path(state_dir, record["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)  # atomic, so a concurrent status() never reads half a file


def _process(record: dict) -> psutil.Process | None:
    """The recorded process if it still runs and is the same one (its start time guards against pid reuse)."""
    try:
        proc = psutil.Process(record["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        recorded = record.get("create_time")
        if recorded is not None and abs(proc.create_time() - recorded) > 1.0:
            return None
        return proc
    except (psutil.Error, KeyError, TypeError):
        return None


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        # trust_env=False: a developer's HTTP(S)_PROXY must not intercept calls to localhost.
        return httpx.get(url, timeout=timeout, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _holder(port: int) -> str:
    """Best effort 'pid N (name)' of whatever listens on the port; empty when the OS will not tell us."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f" (pid {conn.pid}, {psutil.Process(conn.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return ""


def _tail(path: Path, offset: int = 0, lines: int = _TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _server_processes(record: dict) -> list[psutil.Process]:
    """The recorded server and everything it started: its descendants, and any orphan still in its session."""
    found: dict[int, psutil.Process] = {}
    leader = _process(record)
    if leader is not None:
        try:
            found.update((p.pid, p) for p in [leader, *leader.children(recursive=True)])
        except psutil.Error:
            pass
    # A server killed alone (OOM killer, kill -9) leaves its uvicorn worker running, re-parented to init; it keeps
    # the session that start_new_session gave the server, and it was started after it (which rules out pid reuse).
    sid, created = record.get("pid"), record.get("create_time")
    if isinstance(sid, int) and created is not None:
        for proc in psutil.process_iter():
            try:
                if (proc.pid not in found and os.getsid(proc.pid) == sid and proc.create_time() >= created - 1.0
                        and proc.status() != psutil.STATUS_ZOMBIE):
                    found[proc.pid] = proc
            except (psutil.Error, OSError):
                continue
    return list(found.values())


def _kill_tree(procs: list[psutil.Process], timeout_s: float = 20.0) -> None:
    """SIGTERM every process (graceful: database connections closed), then SIGKILL whatever is left."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        # wait_procs also reaps our own children, so no zombie outlives the stop.
        _, procs = psutil.wait_procs(procs, timeout=wait_s)
        if not procs:
            return


# --- lifecycle -----------------------------------------------------------------------------------------------------

def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start(spec: ServerSpec, state_dir: Path | str = STATE_DIR, timeout_s: float = 180) -> dict:
    """Start the server in the background and wait until it is healthy; returns its record.

    A server of that name already running from this state dir is reused (``"reused": True``).
    """
    state_dir = Path(state_dir).absolute()
    existing = _read_record(state_dir, spec.name)
    if existing is not None:
        reused = _reuse(spec, state_dir, existing, timeout_s)
        if reused is not None:
            return reused
    if _port_in_use(spec.host, spec.port):
        raise ServerError(
            f"{spec.name}: port {spec.port} on {spec.host} is already in use by another process{_holder(spec.port)}, "
            f"not the {spec.name} server started from {state_dir}. Stop that process or choose another port "
            f"(e.g. `deeprubin up --{spec.name}-port {spec.port + 1}`)."
        )

    log = _log_path(state_dir, spec.name)
    for directory in (state_dir, log.parent, *spec.dirs):
        Path(directory).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in spec.unset_env}
    env.update(spec.env)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    with open(log, "ab") as fh:
        offset = fh.tell()  # the failure message shows this run's lines only, not an older run's
        fh.write(f"--- {started_at} starting: {' '.join(spec.cmd)}\n".encode())
        fh.flush()
        try:
            proc = subprocess.Popen(spec.cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    env=env, cwd=state_dir, start_new_session=True)
        except OSError as exc:
            raise ServerError(f"{spec.name}: could not run {spec.cmd[0]}: {exc}") from exc
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        create_time = None
    record = {
        "name": spec.name, "pid": proc.pid, "create_time": create_time, "url": spec.url, "ui_url": spec.ui_url,
        "health_url": spec.health_url, "host": spec.host, "port": spec.port, "cmd": spec.cmd,
        "started_at": started_at, "log": str(log),
    }
    _write_record(state_dir, record)

    try:
        reason = _await_health(proc, spec, timeout_s, record)
    except BaseException:  # e.g. Ctrl-C during `deeprubin up`: never leave a half-started server behind
        _abandon(proc, record, state_dir)
        raise
    if reason is None:
        return {**record, "reused": False}
    _abandon(proc, record, state_dir)
    raise ServerError(f"{spec.name} server on {spec.host}:{spec.port} {reason}. Last lines of {log}:\n"
                      f"{_tail(log, offset)}")


def _await_health(proc: subprocess.Popen, spec: ServerSpec, timeout_s: float, record: dict) -> str | None:
    """None once healthy (with ``startup_s`` added to the record), else why it never became so."""
    t0 = time.monotonic()
    while True:
        code = proc.poll()
        if code is not None:
            return f"exited with code {code} before becoming healthy"
        if _healthy(spec.health_url):
            record["startup_s"] = round(time.monotonic() - t0, 1)
            return None
        if time.monotonic() - t0 > timeout_s:
            return f"was not healthy at {spec.health_url} within {timeout_s:g} s"
        time.sleep(0.3)


def _abandon(proc: subprocess.Popen, record: dict, state_dir: Path) -> None:
    _kill_tree(_server_processes(record))
    proc.wait()
    _record_path(state_dir, record["name"]).unlink(missing_ok=True)


def _reuse(spec: ServerSpec, state_dir: Path, record: dict, timeout_s: float) -> dict | None:
    """The running server's record if it can serve this spec; None (and the stale record gone) if it is dead."""
    if _process(record) is None:
        _record_path(state_dir, spec.name).unlink(missing_ok=True)
        return None
    where = f"{record.get('host')}:{record.get('port')}"
    if (record.get("host"), record.get("port")) != (spec.host, spec.port):
        raise ServerError(f"{spec.name} is already running on {where} (pid {record['pid']}), not on "
                          f"{spec.host}:{spec.port}; run `deeprubin down` first to move it.")
    # It may still be starting (a concurrent `up`): give it the same time a fresh start would get.
    deadline = time.monotonic() + timeout_s
    while not _healthy(record["health_url"]):
        if _process(record) is None:
            _record_path(state_dir, spec.name).unlink(missing_ok=True)
            return None
        if time.monotonic() > deadline:
            raise ServerError(f"{spec.name} (pid {record['pid']}) runs on {where} but is not healthy; "
                              f"stop it with `deeprubin down`. Last lines of {record['log']}:\n"
                              f"{_tail(Path(record['log']))}")
        time.sleep(0.3)
    return {**record, "reused": True}


def stop(name: str, state_dir: Path | str = STATE_DIR, timeout_s: float = 20) -> bool:
    """Stop the named server and its workers; True if it was running. Safe to call again."""
    state_dir = Path(state_dir).absolute()
    record = _read_record(state_dir, name)
    if record is None:
        return False
    procs = _server_processes(record)
    _kill_tree(procs, timeout_s)
    _record_path(state_dir, name).unlink(missing_ok=True)
    return bool(procs)


def status(state_dir: Path | str = STATE_DIR) -> list[dict]:
    """One entry per known server (prefect, mlflow, then any other recorded one), running or not."""
    state_dir = Path(state_dir).absolute()
    recorded = sorted(p.stem for p in (state_dir / "run").glob("*.json")) if (state_dir / "run").is_dir() else []
    out = []
    for name in [*NAMES, *(n for n in recorded if n not in NAMES)]:
        record = _read_record(state_dir, name) or {}
        alive = bool(record) and _process(record) is not None
        out.append({
            "name": name, "pid": record.get("pid"), "alive": alive,
            "healthy": alive and _healthy(record["health_url"]),
            "url": record.get("url"), "ui_url": record.get("ui_url"), "port": record.get("port"),
            "log": record.get("log") or str(_log_path(state_dir, name)),
        })
    return out


def up(state_dir: Path | str = STATE_DIR, host: str = HOST, prefect_port: int = PREFECT_PORT,
       mlflow_port: int = MLFLOW_PORT, which: Iterable[str] = NAMES, timeout_s: float = 180) -> dict[str, dict]:
    """Start (or reuse) the chosen servers, concurrently; if one fails, the ones this call started are stopped."""
    state_dir = Path(state_dir).absolute()
    ports = {"prefect": prefect_port, "mlflow": mlflow_port}
    which = list(dict.fromkeys(which))
    unknown = [n for n in which if n not in _SPECS]
    if unknown:
        raise ValueError(f"unknown server(s) {unknown}; choose from {list(NAMES)}")
    specs = [_SPECS[n](state_dir, host, ports[n]) for n in which]
    # Both servers spend their start-up importing and migrating their databases: overlapping them saves wall time.
    with ThreadPoolExecutor(max_workers=len(specs) or 1) as pool:
        futures = {spec.name: pool.submit(start, spec, state_dir, timeout_s) for spec in specs}
    records, errors = {}, []
    for name, fut in futures.items():
        try:
            records[name] = fut.result()
        except ServerError as exc:
            errors.append(str(exc))
    if errors:
        for name, record in records.items():
            if not record.get("reused"):
                stop(name, state_dir)
        raise ServerError("\n\n".join(errors))
    return records


def down(state_dir: Path | str = STATE_DIR, which: Iterable[str] = NAMES) -> dict[str, bool]:
    """Stop the chosen servers; maps each name to whether it was running."""
    return {name: stop(name, state_dir) for name in which}


def client_env(records: Mapping[str, dict] | Iterable[dict]) -> dict[str, str]:
    """The variables a user exports so flows and training use the servers by configuration alone.

    Takes ``up``'s result (name -> record) or ``status``'s list; servers not running are left out.
    """
    items = records.values() if isinstance(records, Mapping) else records
    variables = {"prefect": "PREFECT_API_URL", "mlflow": "MLFLOW_TRACKING_URI"}
    env = {}
    for record in items:
        if record.get("name") in variables and record.get("url") and record.get("alive", True):
            env[variables[record["name"]]] = record["url"]
    return env


@contextmanager
def running(spec: ServerSpec, state_dir: Path | str = STATE_DIR, timeout_s: float = 180) -> Iterator[dict]:
    """Start the server for the block and stop it afterwards, even on error (one this call merely reused is left
    running, since its owner will stop it)."""
    record = start(spec, state_dir, timeout_s)
    try:
        yield record
    finally:
        if not record.get("reused"):
            stop(spec.name, state_dir)


# --- embedded Prefect ----------------------------------------------------------------------------------------------

def embedded_prefect_env(project_dir: Path | str = ".", environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that keep an embedded run's Prefect state in the project: the ephemeral API's sqlite database in
    ``<project_dir>/.prefect/prefect.db`` instead of the user-wide ``~/.prefect/prefect.db``, so runs in two checkouts
    at once never share (and lock) one database; and the ephemeral API a start-up time that a fresh database's
    migrations fit in.

    Empty in servers mode (PREFECT_API_URL set: no ephemeral API starts) and when a database is chosen already."""
    environ = os.environ if environ is None else environ
    if environ.get("PREFECT_API_URL") or any(environ.get(k) for k in _DATABASE_URL_VARS):
        return {}
    database = Path(project_dir).absolute() / EMBEDDED_PREFECT_DIR / "prefect.db"
    env = {"PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database.as_posix()}"}
    if not environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # default 20 s; migrations take ~10 s
    return env


def use_embedded_prefect(project_dir: Path | str = ".") -> Path | None:
    """Apply :func:`embedded_prefect_env` to this process; returns the embedded database (None in servers mode).

    Call it before Prefect is imported: Prefect reads its settings once, at import (the ephemeral API, a subprocess
    started on first use, inherits the environment either way)."""
    env = embedded_prefect_env(project_dir)
    if not env:
        return None
    database = Path(env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].split("///", 1)[1])
    database.parent.mkdir(parents=True, exist_ok=True)  # sqlite will not create it
    os.environ.update(env)
    return database
