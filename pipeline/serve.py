"""`pneumo serve`: a verified registered version behind MLflow's scoring server, with bounds on every request.

Order of events: the alias is resolved once, the version downloaded into a private folder and checked file by
file against the hash promotion recorded (`pipeline.artifact.model_store.verified_copy`: the code, the network
and the threshold and temperature alike, fail closed); only then is anything in it read or imported. The
verified folder is loaded as a pyfunc and served by `mlflow.pyfunc.scoring_server.init` (the same endpoints
and request formats as `mlflow models serve`: /ping, /health, /version, /invocations), wrapped in `Guard`:
- a body limit (413), checked on Content-Length and again on the bytes as they arrive;
- a bound on requests in flight (503 when it is reached, instead of a growing queue of decoded images);
- error answers rewritten to one line: {"error_code", "message"}, without MLflow's `stack_trace` (server paths)
  or its echo of the whole request.
The rows themselves are bounded by the model (`pipeline.artifact.serving.Limits`: rows per request, bytes per
row, decoding in isolated workers with a time and memory cap, a lower pixel cap, scoring in batches).

The folder is deleted when the server stops. Put a reverse proxy with the same body limit in front of it when
it listens beyond loopback (README, "Serving").
"""

from __future__ import annotations

import json
import signal
import sys

from pipeline.errors import InputError

MAX_BODY_BYTES = 64 * 2**20  # a few DICOMs per request, base64 (4/3): well above one 30 MB radiograph
MAX_IN_FLIGHT = 4  # requests decoded and scored at once (each may hold Limits.max_rows images)


class ServeError(InputError):
    """A bad flag value for `pneumo serve`: exit 2."""


def _one_line(body: bytes, status: int) -> bytes:
    """MLflow's error JSON -> {"error_code", "message"} with the message's own reason, on one line."""
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        payload = {"message": body.decode("utf-8", "replace")}
    message = str(payload.get("message", "") if isinstance(payload, dict) else payload)
    if "\nError: " in message:  # MLflow prefixes "Failed to predict data '<the whole request>'"
        message = message.rsplit("\nError: ", 1)[1]
    message = " ".join(message.split())[:300] or f"HTTP {status}"
    code = payload.get("error_code", "BAD_REQUEST") if isinstance(payload, dict) else "BAD_REQUEST"
    return json.dumps({"error_code": code, "message": message}).encode()


async def _answer(send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware around the scoring app: body limit, requests in flight, one-line errors."""

    def __init__(self, app, max_body: int = MAX_BODY_BYTES, max_in_flight: int = MAX_IN_FLIGHT):
        self.app, self.max_body, self.max_in_flight = app, max_body, max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/invocations":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await _answer(send, 413, "REQUEST_TOO_LARGE",
                                 f"request body over the limit of {self.max_body} bytes: send fewer rows per request")
        if self.in_flight >= self.max_in_flight:
            return await _answer(send, 503, "TEMPORARILY_UNAVAILABLE",
                                 f"{self.in_flight} requests in flight (the limit): retry later")
        self.in_flight += 1
        try:
            chunks, size = [], 0
            while True:  # the body read here, under the limit, then handed on whole
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    return await _answer(send, 413, "REQUEST_TOO_LARGE",
                                         f"request body over the limit of {self.max_body} bytes")
                chunks.append(chunk)
                if not message.get("more_body"):
                    break
            body = b"".join(chunks)
            delivered = False

            async def replay():
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            status = {"code": 200}
            held: list = []

            async def rewrite(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    if status["code"] < 400:
                        return await send(message)
                    held.append(message)
                    return None
                if status["code"] < 400:
                    return await send(message)
                held.append(message)
                if not message.get("more_body"):
                    raw = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
                    body_out = _one_line(raw, status["code"])
                    start = held[0]
                    headers_out = [(k, v) for k, v in start.get("headers", []) if k.lower() not in
                                   (b"content-length", b"content-type")]
                    await send({"type": "http.response.start", "status": start["status"],
                                "headers": [*headers_out, (b"content-type", b"application/json"),
                                            (b"content-length", str(len(body_out)).encode())]})
                    await send({"type": "http.response.body", "body": body_out})
                return None

            return await self.app(scope, replay, rewrite)
        finally:
            self.in_flight -= 1


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _check(host: str, port: int, max_body: int, max_in_flight: int) -> None:
    if not 0 < port < 65536:
        raise ServeError(f"--port {port}: not a TCP port (1-65535)")
    if max_body <= 0 or max_in_flight <= 0:
        raise ServeError(f"--max-body {max_body} / --max-in-flight {max_in_flight}: both must be positive")
    if not host:
        raise ServeError("--host is empty")


def serve(uri: str | None = None, *, host: str = "127.0.0.1", port: int = 5001, tracking_uri: str | None = None,
          max_body: int = MAX_BODY_BYTES, max_in_flight: int = MAX_IN_FLIGHT) -> None:
    """Verify, load, serve until interrupted (SIGINT / SIGTERM: uvicorn finishes the requests in flight)."""
    import mlflow.pyfunc
    import uvicorn
    from mlflow.pyfunc import scoring_server

    from pipeline.artifact.model_store import champion_uri, verified_copy
    from pipeline.artifact.serving import close_pools

    _check(host, port, max_body, max_in_flight)
    verified = verified_copy(uri or champion_uri(), tracking_uri)
    try:
        sys.dont_write_bytecode = True  # the verified folder stays exactly as verified
        model = mlflow.pyfunc.load_model(str(verified.folder))
        app = Guard(scoring_server.init(model), max_body, max_in_flight)
        print(f"pneumo serve: {verified.uri} verified (sha256 of every file; threshold {verified.threshold:.4g}, "
              f"temperature {verified.temperature:.4g}); listening on http://{host}:{port}/invocations "
              f"(body <= {max_body} bytes, {max_in_flight} requests in flight)", flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"pneumo serve: listening on {host}, beyond loopback: put a TLS proxy with the same body limit "
                  "in front of it (README, Serving)", flush=True)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=10)
        # uvicorn drains the requests in flight on SIGTERM, then re-raises the signal: as SystemExit here, so
        # the verified folder and the decode workers are still cleaned up (the default action would skip that).
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            uvicorn.Server(config).run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        close_pools()
        verified.close()
