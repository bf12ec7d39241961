"""What every flow shares: configuration, task options, the retry condition, the order of the tasks (:class:`Chain`),
the data lock and artifacts."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from prefect import get_run_logger
from prefect.futures import PrefectTaskRunFuture
from prefect.tasks import Task
from prefect.utilities.annotations import quote

from deeprubin.config import Params, load_project_params

# Stable artifact keys: each run publishes a new version of each, so the UI shows their history night by night.
PULL_ARTIFACT = "nightly-pull"
EVALUATION_ARTIFACT = "nightly-evaluation"
PROMOTION_ARTIFACT = "promotion-decision"
CLASSIFICATION_ARTIFACT = "nightly-classifications"


class TransientError(RuntimeError):
    """A server-side or network failure worth retrying (a source or server was unavailable)."""


class ClientError(RuntimeError):
    """A request the server refused (4xx) or bad input: retrying cannot help."""


def load(params_path: str | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """The configuration of a flow run; also quiets third-party chatter (every flow starts here, whether launched by
    the CLI, a served deployment or a worker)."""
    from deeprubin.tracking import quiet_third_party

    quiet_third_party()
    return load_project_params(params_path, overrides)


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status
    getter = getattr(exc, "get_http_status_code", None)  # MlflowException
    if callable(getter):
        try:
            return int(getter())
        except (TypeError, ValueError):
            return None
    return None


def is_transient(exc: BaseException | None) -> bool:
    """Server errors (5xx, 429), dropped connections and network timeouts are transient; client errors (4xx), bad
    input and bugs are not, and neither is a task that ran out of its own time limit."""
    from prefect.task_engine import TaskRunTimeoutError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ClientError) or isinstance(exc, TaskRunTimeoutError):
            return False
        if isinstance(exc, TransientError):
            return True
        status = _http_status(exc)
        if status is not None:
            return status >= 500 or status == 429
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        try:
            import requests

            if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
                return True
        except ImportError:  # pragma: no cover
            pass
        try:
            import httpx

            if isinstance(exc, httpx.TransportError):
                return True
        except ImportError:  # pragma: no cover
            pass
        exc = exc.__cause__ or exc.__context__
    return False


def retry_on_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry only what :func:`is_transient` calls transient."""
    try:
        exc = state.result(raise_on_failure=False)
    except BaseException as raised:  # noqa: BLE001 - the state may re-raise its exception
        exc = raised
    retry = is_transient(exc if isinstance(exc, BaseException) else None)
    get_run_logger().info("%s: %s -> %s", task.name, type(exc).__name__,
                          "transient, retrying" if retry else "not transient, no retry")
    return retry


def backoff(params: Params) -> list[float]:
    """Exponential backoff: retry_delay_s, 2x, 4x, ... (jitter is added by Prefect's retry_jitter_factor)."""
    return [params.flows.retry_delay_s * 2 ** k for k in range(max(params.flows.retries, 1))]


def configured(task: Task, params: Params, retries: int | None = None) -> Task:
    """``task`` with the retries, backoff, retry condition and timeout of ``params.flows``."""
    n = params.flows.retries if retries is None else retries
    return task.with_options(retries=n, retry_delay_seconds=backoff(params) if n else 0, retry_jitter_factor=0.5,
                             retry_condition_fn=retry_on_transient, timeout_seconds=params.flows.task_timeout_s)


class _Finished(PrefectTaskRunFuture):
    """A task run that has finished, as a future: what ``wait_for`` records as the upstream of the next task run.

    Given the run's State (or a list holding it) instead, Prefect would also search the State's fields, its result
    included, and link to the next run every task whose result holds an object found there (by ``id``)."""

    def __init__(self, state: Any):
        super().__init__(state.state_details.task_run_id)
        self._final_state = state

    def wait(self, timeout: float | None = None) -> None:
        return None

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        return self._final_state.result(raise_on_failure=raise_on_failure)

    def add_done_callback(self, fn: Any) -> None:
        fn(self)


class Chain:
    """Runs a flow's tasks one after the other, and tells Prefect so: each task run waits for (and, in the flow-run
    graph, hangs from) the task run before it, and from nothing else.

    The tasks read and write files (data/raw, data/processed, models/, the registry), not each other's return values,
    so Prefect cannot see their order by itself; worse, it links a task to any earlier task whose result holds an
    object found in its arguments (even an interned string such as ``"simulator"`` in both the ingest summary and
    the configuration), which drew edges from ``ingest`` to almost every task. So every argument is passed quoted
    (never searched for upstream results) and the order is stated with ``wait_for``: the graph is the pipeline.
    """

    def __init__(self, params: Params):
        self.params = params
        self.last: _Finished | None = None  # the task run the next one waits for

    def __call__(self, task: Task, *args: Any, params: Params | None = None, name: str | None = None) -> Any:
        """Run ``task(params, *args)`` (configured by ``params.flows``) after the previous task; its result, or its
        exception once the retries are spent."""
        params = self.params if params is None else params
        runnable = configured(task, params)
        if name is not None:
            runnable = runnable.with_options(task_run_name=name)
        state = runnable(quote(params), *(quote(a) for a in args), wait_for=self.last, return_state=True)
        self.last = _Finished(state)
        return state.result()


def chain_of(params: Params | Chain) -> Chain:
    return params if isinstance(params, Chain) else Chain(params)


@contextmanager
def data_lock(params: Params, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the one slot of the global concurrency limit ``flows.concurrency_limit`` (created when missing), so two
    runs that write the data never overlap; a second run waits for the first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = params.flows.concurrency_limit
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield
