"""The retry condition of the flows' tasks: transient (server, network) errors are retried, client errors are not."""

from __future__ import annotations

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from prefect.task_engine import TaskRunTimeoutError

from deeprubin_flows.common import ClientError, TransientError, backoff, is_transient
from deeprubin.config import load_params


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


@pytest.mark.parametrize("exc", [TransientError("down"), ConnectionResetError(), TimeoutError("read"),
                                 requests.ConnectionError(), _http_error(500), _http_error(503), _http_error(429),
                                 MlflowException("boom", error_code=INTERNAL_ERROR),
                                 MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE)])
def test_server_and_network_errors_are_transient(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [ClientError("404"), _http_error(404), _http_error(400), ValueError("bad input"),
                                 FileNotFoundError("no data"), KeyError("oid"),
                                 MlflowException("missing", error_code=RESOURCE_DOES_NOT_EXIST),
                                 TaskRunTimeoutError("ran out of time"), None])
def test_client_errors_bugs_and_own_timeouts_are_not(exc):
    assert not is_transient(exc)


def test_a_cause_chain_is_followed():
    try:
        try:
            raise ConnectionRefusedError("server down")
        except ConnectionRefusedError as inner:
            raise RuntimeError("stage failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


def test_backoff_is_exponential():
    params = load_params(None, ["flows.retries=4", "flows.retry_delay_s=2"])
    assert backoff(params) == [2, 4, 8, 16]
