"""A local server that speaks Ollama's documented REST API, for testing the Ollama backend.

Ollama itself cannot be installed here, so this implements the parts of its API the backend
uses, as documented (docs/api.md): ``GET /``, ``GET /api/version``, ``GET /api/tags``,
``POST /api/show``, ``POST /api/chat`` with NDJSON streaming over chunked transfer encoding,
``{"error": ...}`` bodies with 400/404 statuses, and the final chunk's timing fields (in
nanoseconds).  Like Ollama, it keeps a prompt cache (``prompt_eval_count`` counts only the
tokens past the common prefix with the previous prompt) and silently cuts the front of a
prompt longer than ``num_ctx`` -- which the client must never let happen; each request
records whether it did.

The "model" is deterministic: it replies ``You said: <message>. I remember <n> messages.``
word by word, or 300 words when the message contains ``long``, with ``token_delay`` seconds
between words.  Every request is recorded, including whether the client went away mid-stream
(a write fails) and how many words were sent before that, so a test can check that a
cancelled turn really stopped the generation.

Tool calls: a request that offers ``tools`` while ``tool_script`` holds replies gets the next
one: a list of ``(name, arguments)`` sent as one chunk's ``message.tool_calls`` (without ids,
as Ollama sends them), then the final chunk.

Knobs for tests: ``prompt_delay`` (seconds before the first chunk, as Ollama loading a model or
computing a long prompt; like Ollama it sends no headers meanwhile and gives up when the client
disconnects), and ``fault``: ``"http500"``, ``"malformed"`` (a line that is not JSON mid-stream) or
``"error"`` (an ``{"error": ...}`` chunk mid-stream, as when the runner crashes).

Run it by hand:  python tests/ollama_api_server.py --port 11434
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from loopback_server import JSONHandler, LoopbackServer


@dataclass
class ChatRecord:
    body: dict[str, Any]
    prompt_tokens: int = 0
    prompt_eval_count: int = 0
    truncated: bool = False
    words_sent: int = 0
    finished: bool = False
    disconnected: bool = False
    done_at: float | None = None
    events: list[str] = field(default_factory=list)


def _tokens(messages: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for m in messages:
        out.append(f"<|{m.get('role')}|>")
        for word in str(m.get("content", "")).split():
            # CJK text has no spaces: count each character as a token, as real tokenizers do.
            out.extend(list(word) if any(ord(c) > 0x2E80 for c in word) else [word])
    return out


class OllamaAPIServer(LoopbackServer[ChatRecord]):
    def __init__(self, port: int = 0, *, models: tuple[str, ...] = ("qwen2.5:3b",),
                 token_delay: float = 0.0, context_length: int = 32768):
        super().__init__(_Handler, port)
        self.models = set(models)
        self.token_delay = token_delay
        self.context_length = context_length
        self.prompt_delay = 0.0
        self.fault: str | None = None
        self.tool_script: list[list[tuple[str, dict[str, Any]]]] = []
        self.requests: list[tuple[str, str]] = []
        self._cache: list[str] = []

    def wait_for_chat_end(self, index: int = -1, timeout: float = 5.0) -> ChatRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.chats and self.chats[index].done_at is not None:
                    return self.chats[index]
            time.sleep(0.01)
        raise AssertionError("the chat request did not end")


class _Handler(JSONHandler):
    server: OllamaAPIServer

    def _read_body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            data = json.loads(raw or b"{}")
        except ValueError as exc:
            self.send_json(400, {"error": f"invalid character in request body: {exc}"})
            return None
        if not isinstance(data, dict):
            self.send_json(400, {"error": "request body must be an object"})
            return None
        return data

    def _client_gone(self) -> bool:
        """True once the client has closed or shut down its end (readable, nothing to read)."""
        sock = self.connection
        if not select.select([sock], [], [], 0)[0]:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _chunk(self, payload: dict[str, Any]) -> None:
        line = json.dumps(payload, ensure_ascii=False).encode() + b"\n"
        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.flush()

    # -- routes ------------------------------------------------------------------------
    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path))
        if self.path == "/":
            body = b"Ollama is running"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/api/version":
            self.send_json(200, {"version": "0.12.6"})
        elif self.path == "/api/tags":
            self.send_json(200, {"models": [{"name": m, "model": m} for m in sorted(self.server.models)]})
        else:
            self.send_json(404, {"error": "404 page not found"})

    def do_POST(self) -> None:
        self.server.requests.append(("POST", self.path))
        body = self._read_body()
        if body is None:
            return
        if self.path == "/api/show":
            model = body.get("model") or body.get("name")
            if model not in self.server.models:
                self.send_json(404, {"error": f"model '{model}' not found"})
                return
            family = str(model).split(":")[0].replace(".", "")
            self.send_json(200, {
                "modelfile": f"FROM {model}",
                "parameters": "stop \"<|im_end|>\"",
                "template": "{{ .Prompt }}",
                "details": {"format": "gguf", "family": family, "parameter_size": "3.1B",
                            "quantization_level": "Q4_K_M"},
                "model_info": {"general.architecture": family,
                               f"{family}.context_length": self.server.context_length},
                "capabilities": ["completion"],
            })
        elif self.path == "/api/chat":
            self._chat(body)
        else:
            self.send_json(404, {"error": "404 page not found"})

    def _chat(self, body: dict[str, Any]) -> None:
        srv = self.server
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(messages, list):
            self.send_json(400, {"error": "messages must be a list"})
            return
        if model not in srv.models:
            self.send_json(404, {"error": f"model \"{model}\" not found, try pulling it first"})
            return
        options = body.get("options") or {}
        num_ctx = int(options.get("num_ctx") or 4096)
        num_predict = int(options.get("num_predict") or -1)
        record = ChatRecord(body=body)
        tokens = _tokens(messages)
        record.prompt_tokens = len(tokens)
        if len(tokens) > num_ctx:  # what Ollama does: keep the end, drop the front, say nothing
            tokens = tokens[-num_ctx:]
            record.truncated = True
        with srv.lock:
            srv.chats.append(record)
            cached = 0
            while cached < min(len(tokens) - 1, len(srv._cache)) and srv._cache[cached] == tokens[cached]:
                cached += 1
            srv._cache = list(tokens)
        record.prompt_eval_count = len(tokens) - cached
        user = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
        if "long" in user:
            words = [f"word{i}" for i in range(300)]
        else:
            words = f"You said: {user}. I remember {len(messages)} messages.".split(" ")
        if num_predict >= 0:
            words = words[:num_predict]
        stream = body.get("stream", True)
        t0 = time.perf_counter_ns()
        created = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        final = {
            "model": model, "created_at": created, "message": {"role": "assistant", "content": ""},
            "done": True, "done_reason": "stop" if num_predict < 0 or len(words) < num_predict else "length",
            "load_duration": 1_000_000, "prompt_eval_count": record.prompt_eval_count,
            "prompt_eval_duration": 2_000_000 + 100_000 * (len(tokens) - cached),
            "eval_count": len(words),
        }
        if srv.fault == "http500":
            record.done_at = time.monotonic()
            self.send_json(500, {"error": "llama runner process has terminated: signal: killed"})
            return
        deadline = time.monotonic() + srv.prompt_delay
        while time.monotonic() < deadline:  # "loading the model": no headers yet
            if self._client_gone():
                record.disconnected, record.done_at = True, time.monotonic()
                self.close_connection = True
                return
            time.sleep(0.005)
        if not stream:
            for _ in words:
                time.sleep(srv.token_delay)
            final["message"]["content"] = " ".join(words)
            final["eval_duration"] = final["total_duration"] = time.perf_counter_ns() - t0
            record.words_sent, record.finished, record.done_at = len(words), True, time.monotonic()
            self.send_json(200, final)
            return
        calls = srv.tool_script.pop(0) if body.get("tools") and srv.tool_script else None
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if calls is not None:
            self._chunk({"model": model, "created_at": created, "done": False, "message": {
                "role": "assistant", "content": "",
                "tool_calls": [{"function": {"name": n, "arguments": a}} for n, a in calls]}})
            final["eval_count"] = len(calls)
            self._chunk(final)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            record.finished, record.done_at = True, time.monotonic()
            return
        try:
            for i, word in enumerate(words):
                if srv.token_delay:
                    time.sleep(srv.token_delay)
                piece = word if i == 0 else " " + word
                self._chunk({"model": model, "created_at": created,
                             "message": {"role": "assistant", "content": piece}, "done": False})
                record.words_sent += 1
                if srv.fault and i == 1:
                    if srv.fault == "malformed":
                        line = b"{this is not json\n"
                        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                    else:
                        self._chunk({"error": "an error was encountered while running the model: out of memory"})
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    return
            final["eval_duration"] = final["total_duration"] = time.perf_counter_ns() - t0
            self._chunk(final)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            record.finished = True
        except (BrokenPipeError, ConnectionResetError, OSError):
            record.disconnected = True  # the client went away: stop generating, as Ollama does
            self.close_connection = True
        finally:
            record.done_at = time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--token-delay", type=float, default=0.02)
    parser.add_argument("--model", action="append", default=None)
    args = parser.parse_args()
    server = OllamaAPIServer(args.port, models=tuple(args.model or ["qwen2.5:3b"]), token_delay=args.token_delay)
    print(f"Ollama API test server on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
