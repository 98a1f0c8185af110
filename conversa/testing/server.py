"""FakeOpenAIServer: a real OpenAI-compatible HTTP server on 127.0.0.1 for tests.

    with FakeOpenAIServer([text("Hi!"), tool_call("add", {"a": 1, "b": 2})]) as server:
        model = OpenAIChatModel("fake-model", base_url=server.base_url, api_key="test")
        ...
        assert server.requests[0]["messages"][-1]["content"] == "hello"

Each POST /v1/chat/completions takes the next scripted reply (see conversa.testing.replies);
when the script is used up, `default_reply(request)` answers (it echoes "echo: <last user
text>"). Requests are validated like the real API (strict=True) and recorded in `requests`.

Streams (SSE, "stream": true) send the text word by word, then tool calls with their
arguments in fragments, the finish chunk, a usage chunk when stream_options.include_usage
is set, and [DONE]. A reply may instead carry a body or stream events to send verbatim, malformed
on purpose (see raw_completion and raw_stream). Pacing for tests: `chunk_delay` (seconds before
each chunk) and `gate` (a threading.Event: the last text chunk waits until it is set, to prove
that deltas arrive incrementally). `usage=(prompt, completion)` fixes the reported token counts.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .replies import Reply, ReplyLike, Responder, echo, split_text, to_reply
from .validation import validate_chat_request


class FakeOpenAIServer:
    """An OpenAI-compatible chat-completions server on a free port of 127.0.0.1."""

    def __init__(
        self,
        replies: Iterable[ReplyLike] = (),
        *,
        default_reply: Responder = echo,
        models: Iterable[str] = ("fake-model",),
        strict: bool = True,
        chunk_delay: float = 0.0,
        usage: tuple[int, int] | None = None,
    ) -> None:
        self.default_reply = default_reply
        self.models = list(models)
        self.strict = strict
        self.chunk_delay = chunk_delay
        # When set to an Event, the last content chunk of each stream waits until it is set;
        # if that takes gate_timeout seconds the stream is dropped, so a client that waits for
        # the whole answer before showing any of it fails instead of hanging.
        self.gate: threading.Event | None = None
        self.gate_timeout = 10.0
        self.usage = usage
        self._lock = threading.Lock()
        self._queue: deque[Reply] = deque(to_reply(r) for r in replies)
        self._requests: list[dict[str, Any]] = []
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        """Bind a free port on 127.0.0.1 and serve in a background thread."""
        if self._httpd is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="FakeOpenAIServer",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port; delayed answers are cut short."""
        self._stopping.set()
        if self.gate is not None:
            self.gate.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> FakeOpenAIServer:
        return self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # -- addresses ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        if self._httpd is None:
            raise RuntimeError("the server is not running; use it as a context manager or start()")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The server root, "http://127.0.0.1:PORT"."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The base URL to give an OpenAI client: "http://127.0.0.1:PORT/v1"."""
        return f"{self.url}/v1"

    # -- script and records ---------------------------------------------------------

    def add_reply(self, *replies: ReplyLike) -> None:
        """Queue replies for the next chat-completion requests, in order."""
        with self._lock:
            self._queue.extend(to_reply(r) for r in replies)

    @property
    def pending(self) -> int:
        """How many scripted replies are still queued."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The parsed JSON bodies of all chat-completion requests so far (a copy)."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def _record_and_pick(self, request: dict[str, Any], *, take_reply: bool) -> Reply | None:
        with self._lock:
            self._requests.append(request)
            return self._queue.popleft() if take_reply and self._queue else None

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


class _Handler(BaseHTTPRequestHandler):
    """Serves one connection for a FakeOpenAIServer."""

    fake: FakeOpenAIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests read requests from FakeOpenAIServer.requests instead."""

    # -- routing --------------------------------------------------------------------

    def do_GET(self) -> None:
        """Serve /v1/models."""
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "conversa"}
                for m in self.fake.models
            ]
            self._send_json(200, {"object": "list", "data": data})
        else:
            self._send_error(404, f"Unknown path {self.path}", "invalid_request_error")

    def do_POST(self) -> None:
        """Serve /v1/chat/completions."""
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send_error(404, f"Unknown path {self.path}", "invalid_request_error")
            return
        try:
            request = json.loads(body)
        except ValueError:
            self._send_error(400, "The request body is not valid JSON.", "invalid_request_error")
            return
        if not isinstance(request, dict):
            self._send_error(
                400, "The request body must be a JSON object.", "invalid_request_error"
            )
            return
        problem = validate_chat_request(request) if self.fake.strict else None
        # a rejected request leaves the script alone, as the real API would not have answered
        scripted = self.fake._record_and_pick(request, take_reply=problem is None)
        if problem is not None:
            message, param = problem
            self._send_error(400, message, "invalid_request_error", param=param)
            return
        reply = scripted if scripted is not None else to_reply(self.fake.default_reply(request))
        self.fake._sleep(reply.delay)
        if self.fake._stopping.is_set():
            return
        try:
            self._answer(request, reply)
        except (BrokenPipeError, ConnectionResetError):
            # the client gave up (timeout, cancel); nothing left to tell it
            self.close_connection = True

    # -- answers --------------------------------------------------------------------

    def _answer(self, request: dict[str, Any], reply: Reply) -> None:
        model = str(request.get("model") or "fake-model")
        fault = reply.fault
        if fault is not None and fault.status >= 400:
            if fault.raw_body is not None:
                self._send_raw(fault.status, fault.raw_body, "text/plain", fault.headers)
            else:
                self._send_error(
                    fault.status,
                    fault.message.replace("{model}", model),
                    fault.error_type,
                    param=fault.param,
                    code=fault.code,
                    headers=fault.headers,
                )
            return
        if request.get("stream"):
            if fault is not None and fault.raw_events is not None:
                self._stream_raw(fault.raw_events)
            else:
                self._stream(request, model, reply)
        elif fault is not None and fault.drop_after_chunks is not None:
            self._drop()
        elif fault is not None and fault.raw_bytes is not None:
            self._send_raw(200, fault.raw_bytes, "application/json", {})
        elif fault is not None and fault.raw_body is not None:
            self._send_raw(200, fault.raw_body, "application/json", {})
        else:
            self._send_json(200, self._completion(model, reply, request))

    def _usage(self, request: dict[str, Any], reply: Reply) -> dict[str, int]:
        if self.fake.usage is not None:
            prompt, completion = self.fake.usage
        else:
            prompt = sum(_count_words(m) for m in request.get("messages") or [])
            completion = len((reply.text or "").split()) + 3 * len(reply.tool_calls)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _completion(self, model: str, reply: Reply, request: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in reply.tool_calls]
        elif reply.text is None:
            message["content"] = ""
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": reply.resolved_finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": self._usage(request, reply),
        }

    def _stream(self, request: dict[str, Any], model: str, reply: Reply) -> None:
        fault = reply.fault
        completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        self._start_stream()
        self._write_event(chunk({"role": "assistant", "content": ""}))
        if fault is not None and fault.raw_body is not None:
            self._write_chunk(f"data: {fault.raw_body}\n\n".encode())
            self._end_chunks()
            return
        pieces = split_text(reply.text or "")
        drop_after = fault.drop_after_chunks if fault is not None else None
        for i, piece in enumerate(pieces):
            if drop_after is not None and i >= drop_after:
                self._drop()
                return
            if i == len(pieces) - 1 and not self._wait_for_gate():
                self._drop()
                return
            self.fake._sleep(self.fake.chunk_delay)
            self._write_event(chunk({"content": piece}))
        if drop_after is not None:
            self._drop()
            return
        for index, call in enumerate(reply.tool_calls):
            self.fake._sleep(self.fake.chunk_delay)
            self._write_event(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call.id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
            )
            # arguments arrive in fragments, as from the real API
            for part in _split_arguments(call.arguments):
                self._write_event(
                    chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
                )
        self._write_event(chunk({}, reply.resolved_finish_reason))
        options = request.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            usage_chunk = chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = self._usage(request, reply)
            self._write_event(usage_chunk)
        self._write_chunk(b"data: [DONE]\n\n")
        self._end_chunks()

    def _stream_raw(self, events: tuple[bytes, ...]) -> None:
        self._start_stream()
        for event in events:
            self._write_chunk(b"data: " + event + b"\n\n")
        self._end_chunks()

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _wait_for_gate(self) -> bool:
        gate = self.fake.gate
        return gate is None or gate.wait(self.fake.gate_timeout)

    # -- low-level writing ----------------------------------------------------------

    def _write_event(self, data: dict[str, Any]) -> None:
        self._write_chunk(b"data: " + json.dumps(data).encode() + b"\n\n")

    def _write_chunk(self, payload: bytes) -> None:
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        # Close without finishing the body: the client sees an incomplete message.
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)

    def _send_raw(
        self, status: int, body: str | bytes, content_type: str, headers: Mapping[str, str]
    ) -> None:
        data = body if isinstance(body, bytes) else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(payload)
        self._send_raw(status, body, "application/json", headers or {})

    def _send_error(
        self,
        status: int,
        message: str,
        error_type: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        payload = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
        self._send_json(status, payload, headers)


def _split_arguments(arguments: str, size: int = 8) -> Iterator[str]:
    for start in range(0, len(arguments), size):
        yield arguments[start : start + size]
    if not arguments:
        yield ""


def _count_words(message: object) -> int:
    if not isinstance(message, dict):
        return 0
    content = message.get("content")
    if isinstance(content, str):
        return len(content.split()) + 1
    return 1
