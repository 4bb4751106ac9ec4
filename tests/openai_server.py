"""A fake OpenAI-compatible chat server for tests and benchmarks (real HTTP on 127.0.0.1).

``POST /v1/chat/completions`` answers with the next scripted action for the caption (the last user
message without its ``Caption: `` prefix); when a caption's script is used up, ``default`` answers.
An action is a reply string, a :class:`Reply` (text and delay), a :class:`Fail` (HTTP status, with
``echo_key`` the request's API key appended to the message, as OpenAI's 401 does) or a :class:`Raw`
answer (any status, content type and body: HTML, truncated JSON ...). The server counts requests and
the most requests it held at once::

    with FakeOpenAIServer(default=layout_reply) as server:
        server.script("A bear walks", Fail(429), "Frame 1: ...")
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
"""
from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Union

CAPTION_PREFIX = "Caption: "


@dataclass(frozen=True)
class Reply:
    text: str
    delay_s: float = 0.0


@dataclass(frozen=True)
class Fail:
    status: int = 500
    message: str = "scripted failure"
    delay_s: float = 0.0
    echo_key: bool = False  # append the request's bearer token to the message


@dataclass(frozen=True)
class Raw:
    """A verbatim answer: ``body`` as is, with this status and content type."""

    body: str
    status: int = 200
    content_type: str = "application/json"
    delay_s: float = 0.0


HTML_ERROR_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>"


Action = Union[str, Reply, Fail, Raw]
# The default answer: a fixed action, or a function of the caption.
Default = Union[Action, Callable[[str], Action], None]


def layout_reply(caption: str, name: str = "object", step_px: int = 60) -> str:
    """A valid v0.1 reply: one object moving right by ``step_px`` per frame."""
    frames = "\n".join(f"Frame {k + 1}: [{{'id': 0, 'name': '{name}', 'box': [{20 + step_px * k}, 200, 100, 100]}}]"
                       for k in range(6))
    return f"Reasoning: {caption} moves to the right.\n\n{frames}\nBackground keyword: street"


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        fake = self.server.fake
        action = fake._take(body)
        try:
            delay_s = fake.delay_s + (action.delay_s if isinstance(action, (Reply, Fail, Raw)) else 0.0)
            if delay_s:
                time.sleep(delay_s)
        finally:
            fake._done()  # before answering: the client may send its next request right after
        try:
            if isinstance(action, Fail):
                message = action.message
                if action.echo_key:
                    message += " " + self.headers.get("Authorization", "").removeprefix("Bearer ")
                self._send_json(action.status, {"error": {"message": message, "type": "scripted"}})
                return
            if isinstance(action, Raw):
                body = action.body.encode()
                self.send_response(action.status)
                self.send_header("Content-Type", action.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            text = action.text if isinstance(action, Reply) else action
            self._send_json(200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many clients connect at once in concurrency tests
    fake: "FakeOpenAIServer"


class FakeOpenAIServer:
    """Start with ``with`` (or :meth:`start`/:meth:`stop`); ``base_url`` ends in ``/v1``."""

    def __init__(self, default: Default = layout_reply, delay_s: float = 0.0):
        self.default = default
        self.delay_s = delay_s
        self.requests: list[dict] = []  # request bodies, in arrival order
        self.max_in_flight = 0
        self._scripts: dict[str, deque] = defaultdict(deque)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- scripting

    def script(self, caption: str, *actions: Action) -> None:
        """Answer the next requests for ``caption`` with ``actions``, in order."""
        with self._lock:
            self._scripts[caption].extend(actions)

    @staticmethod
    def caption_of(body: dict) -> str:
        users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
        last = users[-1] if users else ""
        return last[len(CAPTION_PREFIX):] if last.startswith(CAPTION_PREFIX) else last

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def captions(self) -> list[str]:
        with self._lock:
            return [self.caption_of(body) for body in self.requests]

    def _take(self, body: dict) -> Action:
        caption = self.caption_of(body)
        with self._lock:
            self.requests.append(body)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            script = self._scripts.get(caption)
            if script:
                return script.popleft()
        default = self.default(caption) if callable(self.default) else self.default
        return Fail(500, f"no scripted reply for {caption!r}") if default is None else default

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # -- lifecycle

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeOpenAIServer":
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
