"""Run traces on NDIF with bounded waits and clear errors.

nnsight's own blocking backend opens its websocket with no timeout and keeps waiting
while the host is silent, so a host that stops responding would hang a study forever.
`BoundedRemoteBackend` runs the same protocol (subscribe over a websocket, POST the
serialised trace, stream status frames until COMPLETED) with a connect timeout and an
idle timeout, and turns each failure into a `mechme.errors.RemoteError` that says what
happened and what to try.
"""

from __future__ import annotations

import contextlib
import json

from nnsight.intervention.backends import remote as nn_remote
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.schema.response import Status

from mechme.errors import RemoteError

HOSTED_MODELS_HINT = "run nnsight.ndif_status() to list the models NDIF hosts now"


class BoundedRemoteBackend(RemoteBackend):
    """nnsight's blocking NDIF backend with bounded waits.

    Args:
        model_key: the key nnsight's ``to_model_key()`` returns for the model.
        connect_timeout: seconds to open the websocket and to connect over HTTP.
        idle_timeout: seconds to wait for any message (or HTTP reply) before giving up.
    """

    def __init__(self, model_key: str, *, host: str | None = None, api_key: str | None = None,
                 env: dict | None = None, connect_timeout: float = 10.0, idle_timeout: float = 300.0):
        super().__init__(model_key, host=host, api_key=api_key, env=env, blocking=True)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

    def request(self, request, tracer):
        import websocket

        blob = self._serialize(tracer)
        try:
            connection = websocket.create_connection(
                f"{self.ws_host}/subscribe",
                header={"ndif-api-key": self.api_key} if self.api_key else None,
                timeout=self.connect_timeout,
            )
        except (OSError, websocket.WebSocketException) as err:
            raise RemoteError(
                f"cannot reach the NDIF host {self.host} ({err}); check the NDIF_HOST setting and your network"
            ) from err
        try:
            connection.settimeout(self.idle_timeout)
            request.session_id = json.loads(self._receive(connection))["session_id"]
            try:
                with _http_timeouts(self.connect_timeout, self.idle_timeout):
                    self.send(request, blob)
            except nn_remote.RemoteError as err:
                raise RemoteError(f"NDIF rejected the request: {_strip(err)}; check NDIF_API_KEY and the model id") from err
            while True:
                response = self.parse(self._receive(connection))
                try:
                    result = self.handle(response)
                except nn_remote.RemoteError as err:
                    message = _strip(err)
                    hint = f"; {HOSTED_MODELS_HINT}" if _looks_unhosted(message) else ""
                    raise RemoteError(f"the NDIF job failed: {message}{hint}") from err
                if response.status == Status.COMPLETED:
                    return result
        finally:
            connection.close()

    def _receive(self, connection) -> str | bytes:
        import websocket

        try:
            return connection.recv()
        except websocket.WebSocketTimeoutException as err:
            raise RemoteError(
                f"the NDIF host {self.host} stopped responding: no message for {self.idle_timeout:g} s; "
                "the job may still finish on the server, so retry later or raise idle_timeout"
            ) from err
        except (OSError, websocket.WebSocketException) as err:
            raise RemoteError(f"the connection to the NDIF host {self.host} was lost ({err}); retry later") from err


@contextlib.contextmanager
def _http_timeouts(connect: float, read: float):
    # nnsight reads its HTTP timeouts from module constants (connect 10 s, read 600 s);
    # swap them for this call only.
    saved = nn_remote._CONNECT_TIMEOUT, nn_remote._READ_TIMEOUT
    nn_remote._CONNECT_TIMEOUT, nn_remote._READ_TIMEOUT = connect, read
    try:
        yield
    finally:
        nn_remote._CONNECT_TIMEOUT, nn_remote._READ_TIMEOUT = saved


def _strip(err: Exception) -> str:
    return str(err).removeprefix("Failed to send request: ")


def _looks_unhosted(message: str) -> bool:
    lowered = message.lower()
    return any(word in lowered for word in ("not hosted", "not deployed", "not found", "not available"))


def model_key(loaded) -> str:
    """Return nnsight's model key for an NDIF model, using its repo id as given.

    nnsight canonicalises the repo id with a Hub request; mechme takes the id the user
    wrote, so building the key needs no network.
    """
    import nnsight.modeling.huggingface as hf

    lm = loaded.lm
    repo_id = loaded.repo_id
    if repo_id is None:
        raise RemoteError(f"{loaded.ref} has no repo id, so it cannot run on NDIF; load it as ndif:ORG/NAME")
    hf._ID_CACHE.setdefault(repo_id, repo_id)
    if getattr(lm, "repo_id", None) != repo_id:
        lm.repo_id = repo_id
    return lm.to_model_key()
