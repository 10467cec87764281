"""What Ray Serve's HTTP proxy does for the tree's routes when the trunk (the ingress) fails.
This module runs inside the proxy actor, not in a replica: it imports neither torch nor the app.

Ray Serve's proxy hands each HTTP request to one trunk replica. Two things it does not do:

* a request whose replica dies mid-request (SIGKILL, OOM, a lost node) is not retried: the
  client gets ``500 Internal Server Error`` in plain text, even when another replica is up;
* while the only replica is being replaced, new requests wait in the proxy until the new one
  has started (tens of seconds with torch to import), then are answered.

:class:`TrunkFailover` is an ASGI middleware around the proxy, loaded by it through
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=pipelines.serve.proxy:middlewares`` (set in the Serve
controller's environment by ``splitnet serve``; see ``deploy.PROXY_ENV``). For the tree's routes
(``.../predict``, ``.../metadata``, ``.../healthz``, all idempotent) it:

* replays a request whose replica died without answering (the body is kept for that, up to
  ``REPLAY_MAX_BYTES``), once it has checked that another trunk replica answers;
* answers ``503 {"error": ...}`` with ``Retry-After`` when no trunk replica answers (the only one
  is restarting): for the requests that were on the dead replica, for those waiting, and for new
  ones until a probe sees the trunk back;
* turns the proxy's own plain-text errors for these routes (404 unknown prefix, 408 timeout,
  503 backpressure) into ``{"error": ...}``.

"Does a trunk replica answer?" is a ``GET <route prefix>/healthz`` sent through the proxy itself
with a deadline: it is checked only for a request that failed or has waited ``WATCH_AFTER_S``
without an answer, and shared by the requests that ask at the same time.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.middleware import Middleware

log = logging.getLogger("ray.serve")

ROUTES = ("/predict", "/metadata", "/healthz")  # the app's routes, all safe to send twice
REPLAY_MAX_BYTES = 16 * 2**20   # bodies kept for a replay (the default limits.max_body_bytes)
RETRIES = 2                     # replays of one request whose replica died
WATCH_AFTER_S = 1.0             # a request unanswered this long asks whether a trunk replica answers
PROBE_TIMEOUT_S = 2.0           # how long /healthz may take before the trunk counts as down
RECHECK_EVERY_S = 0.5           # while down: how often to look for the new replica
ALIVE_FOR_S = 1.0               # a positive probe is reused this long
MARK = (b"x-splitnet-proxy", b"failover")  # on every answer it handled: tells that the proxy loaded it


def middlewares() -> list:
    """The proxy callback: ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names this function."""
    return [Middleware(TrunkFailover)]


def is_tree_route(scope: dict) -> bool:
    path = scope.get("path", "")
    return scope.get("type") == "http" and not path.startswith("/-/") and path.endswith(ROUTES)


class _Body:
    """The request's receive channel, recording the body so that a replay can send it again."""

    def __init__(self, receive, max_bytes: int):
        self._receive, self.max_bytes = receive, max_bytes
        self.messages: list[dict] = []
        self.size, self.replayable, self.disconnected = 0, True, False

    def reader(self):
        """A receive() for one attempt: what was recorded, then the live channel."""
        replay = list(self.messages)

        async def receive() -> dict:
            if replay:
                return replay.pop(0)
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
            elif message["type"] == "http.request" and self.replayable:
                self.size += len(message.get("body", b""))
                if self.size > self.max_bytes:  # too big to keep: this request cannot be replayed
                    self.replayable, self.messages = False, []
                else:
                    self.messages.append(message)
            return message

        return receive


class TrunkFailover:
    """ASGI middleware around Ray Serve's HTTP proxy; see the module docstring."""

    def __init__(self, app, retries: int = RETRIES, watch_after_s: float = WATCH_AFTER_S,
                 probe_timeout_s: float = PROBE_TIMEOUT_S, replay_max_bytes: int = REPLAY_MAX_BYTES):
        self.app = app
        self.retries, self.watch_after_s, self.probe_timeout_s = retries, watch_after_s, probe_timeout_s
        self.replay_max_bytes = replay_max_bytes
        self.down: dict[str, str] = {}                 # route prefix -> why no trunk replica answers
        self._alive_at: dict[str, float] = {}          # route prefix -> when a probe last succeeded
        self._probing: dict[str, asyncio.Future] = {}  # route prefix -> the probe under way
        self._recovery: dict[str, asyncio.Task] = {}

    async def __call__(self, scope, receive, send):
        if not is_tree_route(scope):
            return await self.app(scope, receive, send)
        body = _Body(receive, self.replay_max_bytes)
        for attempt in range(1 + self.retries):
            if attempt:
                await asyncio.sleep(0.05 * 2 ** (attempt - 1))
            outcome, prefix = await self._attempt(scope, body.reader(), send)
            if outcome == "answered" or body.disconnected:  # answered, or nobody left to answer
                return
            if outcome == "down":
                return await _error(send, 503, self._down_message(prefix))
            # "died": the proxy answered nothing, i.e. the replica that had the request died
            if not body.replayable:
                return await _error(send, 503, "the trunk replica handling this request died and the body is too "
                                               "large to send again; retry")
            if not await self._alive(prefix):
                self._mark_down(prefix, "a trunk replica died mid-request and no other one answers")
                return await _error(send, 503, self._down_message(prefix))
            log.warning("splitnet proxy: replaying %s %s (its trunk replica died)", scope.get("method"),
                        scope.get("path"))
        await _error(send, 503, f"the trunk replicas failed this request {1 + self.retries} times; retry shortly")

    # -- one pass through the proxy ------------------------------------------------------------
    async def _attempt(self, scope: dict, receive, send) -> tuple[str, str]:
        """Send the request through the proxy once: ("answered" | "died" | "down", route prefix)."""
        # The proxy writes the app's route prefix into root_path: each attempt starts from the original.
        sub = dict(scope, headers=list(scope.get("headers", [])))
        started = False
        json_errors = _JsonErrors(send)

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message, headers=[*message.get("headers", []), MARK])
            await json_errors(message)

        task = asyncio.ensure_future(self.app(sub, receive, tracked))
        try:
            await asyncio.wait({task}, timeout=self.watch_after_s)
            if not task.done() and not started:
                # Slow, or waiting in the proxy for a replica that is not there: ask.
                prefix = _prefix(scope, sub)
                if (prefix in self.down or not await self._alive(prefix)) and not started:
                    self._mark_down(prefix, "no trunk replica answers (Ray Serve is starting a new one)")
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return "down", prefix
            await task
        except asyncio.CancelledError:
            task.cancel()
            raise
        except Exception:  # noqa: BLE001 — the proxy failed this request; answered or not decides
            if started:
                raise
            log.warning("splitnet proxy: %s %s failed in the proxy", scope.get("method"), scope.get("path"),
                        exc_info=True)
        return ("answered" if started else "died"), _prefix(scope, sub)

    # -- is a trunk replica there? -------------------------------------------------------------
    async def _alive(self, prefix: str) -> bool:
        if time.monotonic() - self._alive_at.get(prefix, -1e9) < ALIVE_FOR_S:
            return True
        if prefix not in self._probing:  # one probe at a time per app, shared by all who ask
            self._probing[prefix] = asyncio.ensure_future(self._probe(prefix))
            self._probing[prefix].add_done_callback(lambda _: self._probing.pop(prefix, None))
        return await asyncio.shield(self._probing[prefix])

    async def _probe(self, prefix: str) -> bool:
        """``GET <prefix>/healthz`` through the proxy: True if a trunk replica answers it in time."""
        path = prefix.rstrip("/") + "/healthz"
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"splitnet-proxy-probe")], "client": ("127.0.0.1", 0),
                 "server": ("127.0.0.1", 0), "state": {}}
        status = []
        sent = asyncio.Event()

        async def receive():
            if not sent.is_set():
                sent.set()
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the probe client never disconnects; the deadline ends it

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        try:
            await asyncio.wait_for(self.app(scope, receive, send), self.probe_timeout_s)
        except Exception:  # noqa: BLE001 — a timeout or a failure both mean "no answer"
            pass
        # Any answer but the proxy's own "no replica" kinds means a replica took the request (an
        # app without /healthz answers 404: its replicas are up all the same).
        ok = bool(status) and status[0] < 500 and status[0] != 408
        if ok:
            self._alive_at[prefix] = time.monotonic()
        return ok

    def _mark_down(self, prefix: str, reason: str) -> None:
        if prefix not in self.down:
            log.warning("splitnet proxy: trunk of %s marked unavailable: %s", prefix, reason)
            self.down[prefix] = reason
            self._alive_at.pop(prefix, None)
            self._recovery[prefix] = asyncio.ensure_future(self._recover(prefix))

    async def _recover(self, prefix: str) -> None:
        while prefix in self.down:
            if await self._probe(prefix):
                log.warning("splitnet proxy: trunk of %s answers again", prefix)
                self.down.pop(prefix, None)
            else:
                await asyncio.sleep(RECHECK_EVERY_S)
        self._recovery.pop(prefix, None)

    def _down_message(self, prefix: str) -> str:
        reason = self.down.get(prefix, "no trunk replica answers")
        return f"the trunk is unavailable ({reason}); Ray Serve restarts it by itself, retry shortly"


def _prefix(original: dict, sub: dict) -> str:
    """The app's route prefix, as the proxy wrote it into the attempt's root_path ("/" for the root)."""
    added = sub.get("root_path", "")[len(original.get("root_path", "")):]
    return added or "/"


async def _error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), MARK]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _JsonErrors:
    """A send() that turns a plain-text error answer (the proxy's own: 404, 408, 503) into
    ``{"error": text}``; everything else goes through as it is."""

    def __init__(self, send):
        self.send, self.start, self.chunks = send, None, None

    async def __call__(self, message):
        kind = message["type"]
        if kind == "http.response.start":
            headers = {bytes(k).lower(): bytes(v) for k, v in message.get("headers", [])}
            if message.get("status", 200) >= 400 and headers.get(b"content-type", b"").startswith(b"text/plain"):
                self.start, self.chunks = message, []
                return
        elif kind == "http.response.body" and self.start is not None:
            self.chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            text = b"".join(self.chunks).decode("utf-8", "replace").strip() or "error"
            body = json.dumps({"error": text}).encode()
            kept = [(k, v) for k, v in self.start.get("headers", [])
                    if bytes(k).lower() not in (b"content-type", b"content-length")]
            await self.send({"type": "http.response.start", "status": self.start["status"],
                             "headers": kept + [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
            self.start = None
            return await self.send({"type": "http.response.body", "body": body, "more_body": False})
        await self.send(message)
