"""An OpenAI-compatible HTTP server with scripted faults, for tests and benchmarks.

Retry logic is only as trustworthy as the failures it was tested against, and
a mocked SDK fails the way the mock's author imagined. This server speaks real
HTTP to the real ``openai`` SDK, so a scripted 429 arrives as a real
``openai.RateLimitError`` carrying a real ``Retry-After`` header, a "hang"
really trips the client's timeout, and a "drop" really surfaces as a
connection error. It is stdlib only, so it can run anywhere the package does.

Replies are deterministic, so tests can assert on them:

* Chat (``POST /v1/chat/completions``): the reply is ``"echo: " + U`` where
  ``U`` is the text of the last ``user`` message, verbatim (markers included).
  If the request has a ``system`` message, the reply is prefixed with
  ``"[system: S] "`` where ``S`` is the first 40 characters of the first system
  message. If ``U`` contains ``[json]`` (or the request sets
  ``response_format`` to ``json_object``/``json_schema``), the reply is instead
  ``json.dumps({"echo": U})``, with a ``"system": S`` key added when there is a
  system message, so the content stays parseable JSON. A ``json_schema``
  response format is answered with an object that fits its schema
  (:func:`fake_instance`: an enum takes the first of its values that the
  user text names, else its first; a string is the user text; an integer
  the user text's word count; a boolean whether that count is even), except
  that ``[invalid:N]`` in the user text makes the case's first ``N``
  requests get a reply that fits nothing (``"not what you asked for"``),
  for re-ask tests. Usage counts
  whitespace-separated words: every message's text for ``prompt_tokens``, the
  reply for ``completion_tokens``.
* Embeddings (``POST /v1/embeddings``): :func:`fake_embedding` of each input,
  ``embedding_dim`` long (or the request's ``dimensions``), as floats or as
  base64 float32 (the SDK asks for base64 unless told otherwise).
* ``GET /v1/models`` lists one model; it is not recorded and takes no faults.

Every chat/embeddings request belongs to a *case*, named by a ``[case:NAME]``
marker in the last user message (chat) or in any input string (embeddings);
requests without one belong to ``"default"``. Per case the server records each
request (:class:`RecordedRequest`) and consumes the case's fault script
(:meth:`FakeOpenAIServer.script`). Unique case names keep tests independent
while sharing one server.

The same controls are served over HTTP under ``/_control/`` so a server in
another process (``python -m racto_nb.testing.openai_server``) can be driven
by :class:`FakeOpenAIControl` exactly like an in-process one.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import itertools
import json
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Literal, Protocol, TypeAlias, cast

from racto_nb.lifecycle import StartStop

__all__ = [
    "DEFAULT_CASE",
    "FakeOpenAIControl",
    "FakeOpenAIServer",
    "Fault",
    "FaultLike",
    "OpenAIFaultControl",
    "RecordedRequest",
    "fake_embedding",
    "fake_instance",
    "main",
    "start_in_process",
]

DEFAULT_CASE = "default"
CASE_MARKER = re.compile(r"\[case:([^\]\s]+)\]")
JSON_MARKER = "[json]"
INVALID_MARKER = re.compile(r"\[invalid:(\d+)\]")
#: The reply ``[invalid:N]`` requests get: no JSON, no label.
INVALID_REPLY = "not what you asked for"
SYSTEM_PREFIX_CHARS = 40
MODELS = ("fake-model",)

FaultKind = Literal["status", "hang", "drop"]

# (type, code, message) in the shape OpenAI uses, so SDK exceptions carry
# realistic ``.type`` / ``.code`` and code that inspects them is exercised.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request"),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided"),
    403: ("invalid_request_error", "permission_denied", "You are not allowed to do this"),
    404: ("invalid_request_error", "model_not_found", "The model does not exist"),
    408: ("server_error", "timeout", "Request timed out"),
    409: ("invalid_request_error", "conflict", "Conflict"),
    422: ("invalid_request_error", "unprocessable_entity", "Unprocessable entity"),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached"),
    500: ("server_error", None, "The server had an error while processing your request"),
    502: ("server_error", "bad_gateway", "Bad gateway"),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded"),
    504: ("server_error", "gateway_timeout", "Gateway timeout"),
}


@dataclass(frozen=True)
class Fault:
    """What one request of a case gets instead of (or as) a normal reply.

    ``status`` 200 is a normal reply, so ``["500", "ok"]`` scripts "fail once,
    then succeed, then carry on succeeding". ``retry_after`` is sent verbatim
    as ``Retry-After`` (seconds or an HTTP date: both are legal and clients
    must cope with both); ``retry_after_ms`` as ``retry-after-ms``, which the
    OpenAI SDK prefers when present. ``kind="hang"`` holds the connection
    open without replying for ``hang_s`` seconds (or until the server stops),
    then closes it; ``kind="drop"`` closes it at once without a response.
    """

    status: int = 200
    retry_after: str | None = None
    retry_after_ms: int | None = None
    kind: FaultKind = "status"
    hang_s: float = 30.0
    message: str | None = None
    #: The error body's ``code`` instead of the status's usual one (``"insufficient_quota"`` on a 429).
    code: str | None = None
    #: Extra response headers, on an error or a normal reply (``x-ratelimit-remaining-requests``...).
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("status", "hang", "drop"):
            raise ValueError(f"Fault kind must be 'status', 'hang' or 'drop', not {self.kind!r}")
        if self.kind == "status" and not 200 <= self.status <= 599:
            raise ValueError(f"Fault status must be an HTTP status 200-599, not {self.status}")
        if self.hang_s < 0:
            raise ValueError(f"hang_s must be >= 0, not {self.hang_s}")

    @classmethod
    def ok(cls) -> Fault:
        return cls()

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Fault:
        return cls(kind="hang", hang_s=seconds)

    @classmethod
    def drop(cls) -> Fault:
        return cls(kind="drop")

    @classmethod
    def parse(cls, spec: FaultLike) -> Fault:
        """Accept the shorthands used in scripts.

        Strings: ``"ok"``, an HTTP status (``"500"``, ``"429"``),
        ``"429:RETRY_AFTER"`` (e.g. ``"429:2"``), ``"hang"``, ``"hang:SECONDS"``
        and ``"drop"``. Mappings are the JSON form from :meth:`to_json` (that is
        how faults travel to a server in another process).
        """
        if isinstance(spec, Fault):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        text = spec.strip().lower()
        head, _, arg = text.partition(":")
        if head == "ok":
            return cls()
        if head == "drop":
            return cls.drop()
        if head == "hang":
            return cls.hang(float(arg)) if arg else cls.hang()
        if head.isdigit():
            return cls(status=int(head), retry_after=arg or None)
        raise ValueError(
            f"unknown fault {spec!r}: use 'ok', an HTTP status like '500' or '429:2', 'hang', 'hang:SECONDS' or 'drop'"
        )

    @property
    def label(self) -> str:
        """Short name recorded as a request's outcome."""
        if self.kind != "status":
            return self.kind
        return "ok" if self.status == 200 else str(self.status)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: A fault as scripts may spell it: a :class:`Fault`, a shorthand string, or its JSON form.
FaultLike: TypeAlias = "Fault | str | dict[str, Any]"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it.

    ``arrived_at`` is ``time.monotonic()`` in the server's process; on Linux
    that clock is system-wide, so gaps between arrivals measure a client's
    backoff even when the server runs in another process.
    """

    case: str
    seq: int
    path: str
    arrived_at: float
    authorization: str | None
    model: str | None
    body: dict[str, Any]
    outcome: str = field(default="ok")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordedRequest:
        return cls(**data)


class OpenAIFaultControl(Protocol):
    """What tests need from a fake server, wherever it runs."""

    def script(self, case: str, faults: Sequence[FaultLike], latency_s: float = 0.0) -> None: ...

    def count(self, case: str = DEFAULT_CASE) -> int: ...

    def requests(self, case: str = DEFAULT_CASE) -> list[RecordedRequest]: ...

    def reset(self) -> None: ...

    def set_latency(self, seconds: float) -> None: ...


def fake_embedding(text: str | Sequence[int], dim: int = 8) -> list[float]:
    """The unit vector the server returns for ``text``.

    Derived from SHA-256 so it is stable across processes and Python versions
    (``hash()`` is salted per process), and exposed so tests can compute the
    expected vector instead of hard-coding one.
    """
    if dim < 1:
        raise ValueError(f"embedding dimension must be >= 1, not {dim}")
    data = text.encode() if isinstance(text, str) else json.dumps(list(text)).encode()
    raw = bytearray()
    for block in itertools.count():
        if len(raw) >= 4 * dim:
            break
        raw += hashlib.sha256(b"%d:" % block + data).digest()
    values = [u / 2**31 - 1.0 for u in struct.unpack(f"<{dim}I", bytes(raw[: 4 * dim]))]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


def fake_instance(schema: Any, text: str) -> Any:
    """A deterministic value that fits the JSON ``schema``, derived from ``text`` (see the module docstring)."""
    if not isinstance(schema, dict):
        return None
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return fake_instance(schema[key][0], text)
    if schema.get("enum"):
        folded = text.lower()
        named = [v for v in schema["enum"] if isinstance(v, str) and v.lower() in folded]
        return min(named, key=lambda v: folded.index(v.lower())) if named else schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    words = _words(text)
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: fake_instance(inner, text) for name, inner in props.items()}
    if kind == "array":
        return [fake_instance(schema.get("items") or {}, text)]
    if kind == "integer":
        return words
    if kind == "number":
        return words / 2
    if kind == "boolean":
        return words % 2 == 0
    if kind == "string":
        return text
    return None


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict) and "text" in part)
    return ""


def _words(text: str) -> int:
    return len(text.split())


def _case_of(texts: Iterable[str]) -> str:
    for text in texts:
        match = CASE_MARKER.search(text)
        if match:
            return match.group(1)
    return DEFAULT_CASE


class _BadRequest(Exception):
    pass


@dataclass
class _CaseState:
    faults: list[Fault] = field(default_factory=list)
    latency_s: float = 0.0
    records: list[RecordedRequest] = field(default_factory=list)


class _State:
    """Everything the handlers share; one lock, held only for bookkeeping."""

    def __init__(self, latency_s: float, embedding_dim: int) -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.initial_latency_s = latency_s
        self.latency_s = latency_s
        self.embedding_dim = embedding_dim
        self.cases: dict[str, _CaseState] = {}
        self.ids = itertools.count(1)

    def script(self, case: str, faults: Sequence[FaultLike], latency_s: float) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, not {latency_s}")
        parsed = [Fault.parse(f) for f in faults]
        with self.lock:
            state = self.cases.setdefault(case, _CaseState())
            state.faults = parsed
            state.latency_s = latency_s

    def set_latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, not {seconds}")
        with self.lock:
            self.latency_s = seconds

    def reset(self) -> None:
        with self.lock:
            self.cases.clear()
            self.latency_s = self.initial_latency_s

    def admit(self, case: str, path: str, authorization: str | None, body: dict[str, Any]) -> tuple[Fault, float, int]:
        """Record a request and decide its fate: (fault, latency, seq within case)."""
        arrived = time.monotonic()
        model = body.get("model")
        with self.lock:
            state = self.cases.setdefault(case, _CaseState())
            fault = state.faults.pop(0) if state.faults else Fault()
            seq = len(state.records) + 1
            state.records.append(
                RecordedRequest(
                    case=case,
                    seq=seq,
                    path=path,
                    arrived_at=arrived,
                    authorization=authorization,
                    model=model if isinstance(model, str) else None,
                    body=body,
                    outcome=fault.label,
                )
            )
            return fault, self.latency_s + state.latency_s, seq

    def records(self, case: str) -> list[RecordedRequest]:
        with self.lock:
            state = self.cases.get(case)
            return list(state.records) if state else []


class _Handler(BaseHTTPRequestHandler):
    #: Headers the current request's fault adds to its reply (set by ``_admit``).
    reply_headers: dict[str, str] = {}  # noqa: RUF012 - replaced per request, never mutated
    # HTTP/1.1 keep-alive lets the SDK's pool reuse connections; at ~1000
    # req/s a TCP handshake per request would dominate. Every response sets
    # Content-Length, which keep-alive requires.
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    sys_version = ""
    # Headers and body go out in one buffered write, and Nagle is off, so a
    # small response never waits on the client's delayed ACK (a 40 ms stall).
    disable_nagle_algorithm = True
    wbufsize = -1

    @property
    def state(self) -> _State:
        return cast(_FakeHTTPServer, self.server).state

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: a line per request on stderr drowns test output."""

    # -- plumbing -------------------------------------------------------------

    def _read_body(self) -> bytes:
        # Always drain the body, even for requests we reject, or the next
        # request on this keep-alive connection would start mid-body.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error_json(
        self,
        status: int,
        message: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        fallback = ("server_error" if status >= 500 else "invalid_request_error", None, "Error")
        kind, usual, default = _ERRORS.get(status, fallback)
        error = {"message": message or default, "type": kind, "param": None, "code": code or usual}
        self._send_json(status, {"error": error}, headers)

    def _drop(self) -> None:
        self.close_connection = True

    # -- routing --------------------------------------------------------------

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        params = urllib.parse.parse_qs(query)
        case = params.get("case", [DEFAULT_CASE])[0]
        if path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "racto-nb"} for m in MODELS]
            self._send_json(200, {"object": "list", "data": data})
        elif path == "/_control/requests":
            self._send_json(200, [r.to_json() for r in self.state.records(case)])
        elif path == "/_control/count":
            self._send_json(200, {"case": case, "count": len(self.state.records(case))})
        else:
            self._send_error_json(404, f"no route for GET {path}")

    def do_POST(self) -> None:
        raw = self._read_body()
        path = self.path.partition("?")[0]
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise _BadRequest("request body must be a JSON object")
            if path.startswith("/_control/"):
                self._control(path, body)
            elif path == "/v1/chat/completions":
                self._chat(path, body)
            elif path == "/v1/embeddings":
                self._embeddings(path, body)
            else:
                self._send_error_json(404, f"no route for POST {path}")
        except (_BadRequest, ValueError, TypeError, KeyError) as exc:
            self._send_error_json(400, str(exc))

    def _control(self, path: str, body: dict[str, Any]) -> None:
        if path == "/_control/script":
            self.state.script(
                str(body.get("case", DEFAULT_CASE)),
                list(body.get("faults", [])),
                float(body.get("latency_s", 0.0)),
            )
        elif path == "/_control/reset":
            self.state.reset()
        elif path == "/_control/latency":
            self.state.set_latency(float(body["seconds"]))
        else:
            self._send_error_json(404, f"no control {path}")
            return
        self._send_json(200, {"ok": True})

    def _admit(self, case: str, path: str, body: dict[str, Any]) -> int | None:
        """Apply latency and the case's next fault; the seq if a reply is due, else None."""
        fault, latency, seq = self.state.admit(case, path, self.headers.get("Authorization"), body)
        stopping = self.state.stopping
        if latency > 0 and stopping.wait(latency):
            self._drop()
            return None
        if fault.kind == "hang":
            stopping.wait(fault.hang_s)
            self._drop()
            return None
        if fault.kind == "drop":
            self._drop()
            return None
        self.reply_headers = dict(fault.headers or {})
        if fault.status != 200:
            headers = {"x-request-id": f"req_{case}_{seq}", **self.reply_headers}
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            if fault.retry_after_ms is not None:
                headers["retry-after-ms"] = str(fault.retry_after_ms)
            message = fault.message or (
                f"{_ERRORS.get(fault.status, ('', None, 'Error'))[2]} "
                f"(injected by FakeOpenAIServer: case {case!r}, request #{seq})"
            )
            self._send_error_json(fault.status, message, headers, code=fault.code)
            return None
        return seq

    def _chat(self, path: str, body: dict[str, Any]) -> None:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty list")
        if body.get("stream"):
            raise _BadRequest("FakeOpenAIServer does not stream; call without stream=True")
        user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
        user_text = _text_of(user.get("content"))
        system_msg = next((m for m in messages if isinstance(m, dict) and m.get("role") == "system"), None)
        system = _text_of(system_msg.get("content"))[:SYSTEM_PREFIX_CHARS] if system_msg else None
        seq = self._admit(_case_of([user_text]), path, body)
        if seq is None:
            return
        response_format = body.get("response_format")
        json_mode = JSON_MARKER in user_text or (
            isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")
        )
        invalid = INVALID_MARKER.search(user_text)
        schema = (response_format.get("json_schema") or {}).get("schema") if isinstance(response_format, dict) else None
        if invalid and seq <= int(invalid.group(1)):
            content = INVALID_REPLY
        elif isinstance(schema, dict):
            content = json.dumps(fake_instance(schema, user_text))
        elif json_mode:
            reply: dict[str, str] = {"echo": user_text}
            if system is not None:
                reply["system"] = system
            content = json.dumps(reply)
        else:
            content = ("" if system is None else f"[system: {system}] ") + "echo: " + user_text
        prompt_tokens = sum(_words(_text_of(m.get("content"))) for m in messages if isinstance(m, dict))
        completion_tokens = _words(content)
        self._send_json(
            200,
            {
                "id": f"chatcmpl-fake-{next(self.state.ids)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", MODELS[0]),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "system_fingerprint": None,
            },
            self.reply_headers,
        )

    def _embeddings(self, path: str, body: dict[str, Any]) -> None:
        raw = body.get("input")
        inputs: list[str | list[int]]
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw):
            inputs = [raw]  # one pre-tokenised input
        elif isinstance(raw, list) and raw and all(isinstance(t, (str, list)) for t in raw):
            inputs = raw
        else:
            raise _BadRequest("'input' must be a string, a list of strings or a list of token lists")
        dim = body.get("dimensions") or self.state.embedding_dim
        if not isinstance(dim, int) or dim < 1:
            raise _BadRequest("'dimensions' must be a positive integer")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _BadRequest("'encoding_format' must be 'float' or 'base64'")
        seq = self._admit(_case_of(t for t in inputs if isinstance(t, str)), path, body)
        if seq is None:
            return
        data = []
        for index, item in enumerate(inputs):
            vector = fake_embedding(item, dim)
            embedding: list[float] | str = (
                vector if encoding == "float" else base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(_words(t) if isinstance(t, str) else len(t) for t in inputs)
        self._send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": body.get("model", MODELS[0]),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )


class _FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Benchmarks open many connections at once; the default backlog of 5
    # turns a burst into SYN retransmits (1 s stalls) on the client side.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.state = state
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS round trip
        # that can take seconds on a badly configured box; we never use it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up before its (delayed) reply is a
        # normal event here, not a traceback on stderr.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Wake handler threads parked on idle keep-alive sockets so they exit."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class FakeOpenAIServer(StartStop):
    """The server, in a daemon thread of this process.

    ``latency_s`` is added to every chat/embeddings request (benchmarks use it
    to stand in for a model's think time); a case's ``latency_s`` from
    :meth:`script` is added on top. Latencies, hangs and the rest are waits on
    one event, so :meth:`stop` returns promptly even mid-hang.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency_s: float = 0.0,
        embedding_dim: int = 8,
    ) -> None:
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, not {embedding_dim}")
        self.host = host
        self.port = port
        self._state = _State(latency_s, embedding_dim)
        self._httpd: _FakeHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = self.base_url if self._httpd else "not started"
        return f"FakeOpenAIServer({where})"

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``: pass it as ``base_url`` to ``openai.OpenAI``."""
        return f"{self.url}/v1"

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, the root the control endpoints hang off."""
        if self._httpd is None:
            raise RuntimeError("FakeOpenAIServer is not started; call start() or use it as a context manager")
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeOpenAIServer:
        if self._httpd is not None:
            raise RuntimeError("FakeOpenAIServer is already started")
        if self._state.stopping.is_set():
            raise RuntimeError("FakeOpenAIServer cannot be restarted; create a new one")
        self._httpd = _FakeHTTPServer((self.host, self.port), self._state)
        self.port = self._httpd.server_port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeOpenAIServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hanging and sleeping requests are released at once."""
        httpd = self._httpd
        if httpd is None or self._state.stopping.is_set():
            return
        self._state.stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- control --------------------------------------------------------------

    def script(self, case: str, faults: Sequence[FaultLike], latency_s: float = 0.0) -> None:
        """Give the next requests of ``case`` these faults, in order; later ones succeed.

        Replaces any earlier script for the case (its records are kept).
        """
        self._state.script(case, faults, latency_s)

    def set_latency(self, seconds: float) -> None:
        self._state.set_latency(seconds)

    def count(self, case: str = DEFAULT_CASE) -> int:
        return len(self._state.records(case))

    def requests(self, case: str = DEFAULT_CASE) -> list[RecordedRequest]:
        return self._state.records(case)

    def reset(self) -> None:
        """Forget every case's records and script, and restore the initial latency."""
        self._state.reset()


class FakeOpenAIControl:
    """Drive a :class:`FakeOpenAIServer` in another process over ``/_control/``.

    Same methods as the server itself, so fixtures can hand either to a test.
    Proxies from the environment are ignored: the server is local by design.
    """

    def __init__(self, base_url: str, *, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        root = self.base_url
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        self.url = root
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"FakeOpenAIControl({self.base_url!r})"

    def _call(self, method: str, path: str, payload: object | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"{method} {path} failed with HTTP {exc.code}: {detail}") from exc

    def script(self, case: str, faults: Sequence[FaultLike], latency_s: float = 0.0) -> None:
        wire = [Fault.parse(f).to_json() for f in faults]  # validate here, not in the server
        self._call("POST", "/_control/script", {"case": case, "faults": wire, "latency_s": latency_s})

    def set_latency(self, seconds: float) -> None:
        self._call("POST", "/_control/latency", {"seconds": seconds})

    def count(self, case: str = DEFAULT_CASE) -> int:
        query = urllib.parse.urlencode({"case": case})
        return int(self._call("GET", f"/_control/count?{query}")["count"])

    def requests(self, case: str = DEFAULT_CASE) -> list[RecordedRequest]:
        query = urllib.parse.urlencode({"case": case})
        return [RecordedRequest.from_json(r) for r in self._call("GET", f"/_control/requests?{query}")]

    def reset(self) -> None:
        self._call("POST", "/_control/reset", {})


def start_in_process(*extra_args: str) -> tuple[subprocess.Popen[str], str]:
    """The server in a process of its own (its own GIL, so it never slows the process it measures).

    Returns the process (terminate it when done) and its base URL, read from the first line it prints.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "racto_nb.testing.openai_server", "--port", "0", *extra_args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, printing the base URL as the first stdout line.

    The line is how a parent process learns the port it asked the kernel for.
    """
    parser = argparse.ArgumentParser(
        prog="python -m racto_nb.testing.openai_server",
        description="OpenAI-compatible fake server with fault injection (see /_control/).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    parser.add_argument("--embedding-dim", type=int, default=8)
    args = parser.parse_args(argv)

    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with FakeOpenAIServer(args.host, args.port, latency_s=args.latency, embedding_dim=args.embedding_dim) as srv:
        print(srv.base_url, flush=True)
        while not done.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
