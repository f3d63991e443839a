"""Joining a Ray cluster, or starting a local one, for `run`: the checks that turn what Ray
would answer with a traceback or minutes of retries (a dashboard URL, nothing listening,
a token-auth head without the token, GPUs that do not exist) into one line at once.

The dispatch of shards over actors is `runner.py`; this module only gets the driver
connected, and says which endpoints the driver cannot live without (`liveness.py`
watches them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import ray
from ray.exceptions import AuthenticationError, RayError

from ldm_jobs.jobs.errors import JobFailed, last_line
from ldm_jobs.jobs.spec import JobSpec

# How long a named cluster's port may take to accept a TCP connection before `run` says it
# is unreachable (Ray itself would retry for minutes, printing only warnings).
ADDRESS_PROBE_SECONDS = 10.0


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[bool]:
    """Join `address` (`run_job` resolves --address or RAY_ADDRESS into it), else start a
    local Ray; reuse one already up.

    Yields whether Ray was started here, and shuts down only what it started.
    """
    if ray.is_initialized():
        yield False
        return
    quiet_ray_banners()
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, RayError) as error:
            raise JobFailed(join_failure(address, error)) from None
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield address is None
    finally:
        ray.shutdown()


class _DropBanners(logging.Filter):
    """Drops the notices Ray prints on every local start ("Token authentication is enabled
    for this Ray cluster..."): noise on each CLI run. Ray's own log files keep them."""

    BANNERS = ("Token authentication is enabled for this Ray cluster",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.BANNERS)


def quiet_ray_banners() -> None:
    """Keep Ray's start-up banners out of this process's output (idempotent)."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropBanners) for f in logger.filters):
        logger.addFilter(_DropBanners())


def cluster_endpoints() -> dict[str, tuple[str, int]]:
    """The head's GCS and this machine's raylet: the two a driver cannot work without.
    Read from Ray's own state; a connection without them (Ray client) is not watched."""
    endpoints: dict[str, tuple[str, int]] = {}
    if not ray.is_initialized():  # (get_runtime_context would start a Ray)
        return endpoints
    with contextlib.suppress(Exception):  # private state: missing parts mean "not watched"
        host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
        endpoints["the head's GCS"] = (host, int(port))
        node = ray._private.worker.global_worker.node
        endpoints["this machine's raylet"] = (node.node_ip_address, int(node.node_manager_port))
    return endpoints


def check_address(address: str, source: str = "--address") -> None:
    """Fail at once, with a message, on an address Ray would reject with a traceback (a
    dashboard URL) or retry for minutes (nothing listening there)."""
    if address == "local":
        return
    given = address
    if address == "auto":  # the Ray that `ray start` recorded on this machine, if any
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die
        except ImportError:  # a private helper: without it, Ray judges at ray.init
            return
        try:
            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as error:
            raise JobFailed(f"{source} auto: {last_line(error)}") from None
    if address.startswith(("http://", "https://")):
        raise JobFailed(
            f"{source} {address}: that is a dashboard / Jobs API address; `run` joins a "
            "cluster by its GCS address (HEAD:6379) or ray://HEAD:10001. To hand the job to "
            f"the cluster instead, use `ldm-jobs submit JOB.yaml --address {address}`")
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # a form we do not know: let Ray judge it
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_PROBE_SECONDS).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise JobFailed(
            f"{source} {address}: nothing answers at {host}:{port} ({reason}); is the Ray "
            "head up, and is this its GCS port (6379) or its client port (ray://, 10001)?"
        ) from None
    if not address.startswith("ray://"):
        refusal = _token_refusal(host, int(port), auto=given == "auto")
        if refusal:
            raise JobFailed(f"could not join the Ray cluster at {address}: {refusal}")


JOIN_HINT = ("later runs on this machine join it by themselves; one that names its address "
             "(--address, RAY_ADDRESS) needs RAY_AUTH_MODE=token and the cluster's token "
             "(RAY_AUTH_TOKEN or ~/.ray/auth_token) when the head uses token auth, as "
             "`ray start` does once ~/.ray/auth_token exists; stop it with `ray stop`")
TOKEN_HINT = ("make the cluster's token available (RAY_AUTH_TOKEN, or the file "
              "~/.ray/auth_token or RAY_AUTH_TOKEN_PATH) and set RAY_AUTH_MODE=token")


def _local_token() -> str | None:
    """The token Ray would send, from where Ray reads it: RAY_AUTH_TOKEN, else the file
    named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _token_refusal(host: str, port: int, *, auto: bool = False) -> str | None:
    """Why the GCS at host:port refuses this machine, asked the way `ray.init` first asks
    (its cluster id), with the token Ray would send; None when it answers or the question
    cannot be put. A token-auth cluster answers UNAUTHENTICATED at once, where `ray.init`
    retries for 20 s printing a warning a second."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # Ray's internals moved: ray.init judges, slowly but correctly
        return None
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    # Ray sends a token with RAY_AUTH_MODE=token; for `auto` also when the mode is unset.
    token = _local_token() if mode == "token" or (auto and not mode) else None
    metadata = [("authorization", f"Bearer {token}")] if token else []
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata,
                              timeout=ADDRESS_PROBE_SECONDS)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                return None
            if token:
                return ("it refused this machine's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                        "or ~/.ray/auth_token); use the cluster's own token")
            return f"it wants an authentication token (Ray's token auth); {TOKEN_HINT}"
    return None


def join_failure(address: str, error: BaseException) -> str:
    """What went wrong joining `address`, without Ray's chained tracebacks."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    # Ray keeps the cause as an exception or, from its GCS client, as text in the message.
    if any(isinstance(e, AuthenticationError) or "InvalidAuthToken" in str(e)
           or "AuthenticationError" in str(e) for e in chain):
        return (f"could not join the Ray cluster at {address}: it wants an authentication "
                f"token (Ray's token auth); {TOKEN_HINT}")
    return f"could not join the Ray cluster at {address}: {last_line(chain[0])}"


def check_placeable(spec: JobSpec) -> None:
    """On a local Ray, asking for GPUs that do not exist would wait forever: fail now."""
    gpus = spec.compute.gpus_per_actor
    if gpus > 0 and ray.cluster_resources().get("GPU", 0.0) < gpus:
        raise JobFailed(
            f"compute.gpus_per_actor: {gpus} GPU(s) per actor asked, but the local Ray has "
            f"{ray.cluster_resources().get('GPU', 0.0):g}; set it to 0 or join a GPU cluster "
            "with --address"
        )
