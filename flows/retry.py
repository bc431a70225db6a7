"""When a stage task is retried: transient failures (storage or network I/O, a lost Ray worker
or connection) with exponential backoff; bad input, config or code fail at once."""
from __future__ import annotations

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from goalrank_core.errors import GoalRankInputError

RETRIES = 3

# Exception class names (anywhere in the MRO or the cause chain) that mean "try again later".
_TRANSIENT_NAMES = {
    # Ray: a worker, actor, node or the connection went away
    "RaySystemError", "RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
    "NodeDiedError", "ObjectLostError", "OwnerDiedError", "GetTimeoutError", "RayChannelTimeoutError",
    "WorkerGroupError", "ControllerError",
    # botocore / urllib3 / requests / httpx
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "RemoteDisconnected", "ProtocolError",
}
# OSErrors that are not going to fix themselves.
_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: I/O and connection errors, lost Ray workers. Never for
    bad input or config (GoalRankInputError), missing files or programming errors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GoalRankInputError):
            return False
        if isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS):
            return True  # includes ConnectionError, TimeoutError, pyarrow's I/O errors
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task_obj, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only a transient failure."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classifying, not handling
        transient = is_transient(exc)
        if not transient:
            print(f"[{task_run.name}] not retried: {type(exc).__name__}: {exc}", flush=True)
        return transient
    return False


TASK_OPTS = dict(
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),  # 2, 4, 8 s
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,  # stages skip completed work themselves (manifests)
    log_prints=True,
)
