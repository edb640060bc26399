"""What the Ollama and OpenAI surfaces of the service cost per request, against the native API,
and the first token of a conversation's second request on the embedded model, warm vs cold.

**1. Per-request overhead** (the service's fake backend, no delay: what is timed is the service's
own work, not a model's).  One ``serve`` process (1 worker, file store) on loopback.  Each row is
one way in, with the request shape its real clients send:

* ``native`` / ``native stream``: ``POST /v1/sessions/{id}/messages`` ``{"text"}`` (JSON, and
  ``stream: true`` server-sent events): the baseline;
* ``ollama`` / ``ollama stream``: ``POST /api/chat`` shaped as Home Assistant's Ollama integration
  sends it: no session id (the session is the one named after the model), its system prompt,
  ``tools``, ``options.num_ctx``, ``keep_alive``, and only the last 20 rounds of the history
  (its ``max_history``) then the new message;
* ``openai`` / ``openai stream``: ``POST /v1/chat/completions`` shaped as Open WebUI sends it:
  ``X-OpenWebUI-Chat-Id``, the whole chat then the new message (``stream_options.include_usage``
  when streaming).

Every row runs on its own sessions, seeded through the public API (a sequence of requests, the
replies stored) to 10 or 1,000 messages; the rows take turns request by request, so a noisy
moment of the shared machine falls on all of them.  Each timed request adds a turn: a session
serves ``--per-session`` requests (history 10 -> 10 + 2k; 1,000 -> 1,000 + 2k), then the next
session of the pool takes over.  Time is the client's wall time from sending the (pre-encoded)
body to the last byte of the answer, over one kept-alive connection.  ``overhead`` is a row's
p50 minus the native row's p50 at the same size (streaming rows against ``native stream``).
Reconciliation reads only the client's messages: flat in the stored history for Home Assistant's
window; Open WebUI's shape sends the whole chat, so its cost grows with what the client sends.

**2. First token of the second request** (the embedded model, greedy, ``--max-tokens 16``): a
``serve`` process on the bundled model; a conversation's second ``/api/chat`` (streaming,
``X-Session-Id``) after its first, against the same request sent cold (a new id: the service
takes the client's earlier messages as the conversation, so the model computes the whole
prompt), and against a warm one whose system prompt's time line changed since the first
request (what Home Assistant does).  First token = the first chunk with text; ``computed`` is
Ollama's ``prompt_eval_count`` (prompt tokens not served from the KV cache).

    .venv/bin/python bench/bench_compat.py                  # ~3-5 minutes on 2 shared cores
    .venv/bin/python bench/bench_compat.py --smoke          # tiny sizes, a few seconds (+ the model's load)
    .venv/bin/python bench/bench_compat.py --no-embedded --requests 100

Markdown tables on stdout, progress on stderr; ``--json PATH`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-compat-" + os.urandom(8).hex()
HA_SYSTEM = ("You are a voice assistant for Home Assistant.\nAnswer questions about the world truthfully.\n"
             "Answer in plain text. Keep it simple and to the point.\n"
             "Current time is 08:00:00. Today's date is 2026-12-06.\n"
             "An overview of the areas and the devices in this smart home:\n"
             + "".join(f"- names: Light {i}\n  domain: light\n  state: 'off'\n  areas: Room {i % 7}\n"
                       for i in range(40)))
HA_TOOLS = [{"type": "function", "function": {
    "name": name, "description": f"{name} for a device, an area or a floor",
    "parameters": {"type": "object", "properties": {
        "name": {"type": "string"}, "area": {"type": "string"}, "floor": {"type": "string"},
        "domain": {"type": "array", "items": {"type": "string"}}}}}}
    for name in ("HassTurnOn", "HassTurnOff", "HassLightSet", "HassGetState", "HassListAddItem")]
HA_MAX_HISTORY = 20  # rounds kept by Home Assistant's Ollama integration (its default)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_text(i: int) -> str:
    """A spoken request's length (~100 characters), different each time."""
    return f"Message {i}: please turn the kitchen lights to forty percent and tell me how warm it is outside."


@contextmanager
def serve(folder: Path, *args: str, ready_s: float = 300.0) -> Iterator[str]:
    """A real ``serve`` process on a free loopback port; its URL.  Stopped with SIGTERM."""
    port = free_port()
    logfile = open(folder / f"serve-{port}.log", "wb")  # closed below
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "conversation_session.service", "--port", str(port),
                             "--token", TOKEN, "--rate", "1000000", "--burst", "1000000", "--log-level", "WARNING",
                             "--sessions-dir", str(folder / f"sessions-{port}"), *args],
                            stdout=logfile, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited ({proc.returncode}); see {logfile.name}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"serve did not get ready in {ready_s} s; see {logfile.name}")
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logfile.close()


# -- 1. per-request overhead ----------------------------------------------------------------------
@dataclass
class Conversation:
    """One session of one row, and what its client holds of it."""

    key: str                                   # session id (native), model name (ollama), chat id (openai)
    messages: list[dict[str, str]] = field(default_factory=list)
    said: int = 0


def _read_all(resp: httpx.Response) -> bytes:
    return b"".join(resp.iter_bytes())


def _check(resp: httpx.Response, body: bytes) -> None:
    if resp.status_code != 200:
        raise RuntimeError(f"{resp.request.url.path}: {resp.status_code} {body[:300]!r}")


def _reply_of(kind: str, body: bytes) -> str:
    """The reply's text, from each API's answer (the client stores it, as the real ones do)."""
    if kind == "native":
        return str(json.loads(body)["response"])
    if kind == "native stream":
        text = ""
        for block in body.decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if lines.get("event") == "piece":
                text += json.loads(lines["data"])["text"]
        return text
    if kind == "ollama":
        return str(json.loads(body)["message"]["content"])
    if kind == "ollama stream":
        return "".join(json.loads(line)["message"]["content"] for line in body.decode().splitlines() if line.strip())
    if kind == "openai":
        return str(json.loads(body)["choices"][0]["message"]["content"])
    text = ""
    for block in body.decode().split("\n\n"):
        data = block.removeprefix("data: ").strip()
        if data and data != "[DONE]":
            for choice in json.loads(data).get("choices", []):
                text += choice["delta"].get("content") or ""
    return text


def request_of(kind: str, conv: Conversation, text: str) -> tuple[str, dict[str, str], bytes]:
    """(path, headers, body) of the next request, shaped as the row's real client sends it."""
    new = {"role": "user", "content": text}
    stream = kind.endswith("stream")
    if kind.startswith("native"):
        return f"/v1/sessions/{conv.key}/messages", {}, json.dumps({"text": text, "stream": stream}).encode()
    if kind.startswith("ollama"):
        tail = conv.messages[-2 * HA_MAX_HISTORY:]
        body = {"model": conv.key, "stream": stream, "keep_alive": -1, "options": {"num_ctx": 8192},
                "tools": HA_TOOLS, "messages": [{"role": "system", "content": HA_SYSTEM}, *tail, new]}
        return "/api/chat", {}, json.dumps(body).encode()
    body = {"model": "bench", "stream": stream, "messages": [*conv.messages, new]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", {"X-OpenWebUI-Chat-Id": conv.key}, json.dumps(body).encode()


def send(client: httpx.Client, kind: str, conv: Conversation, text: str) -> float:
    path, headers, body = request_of(kind, conv, text)
    headers = {**headers, "Content-Type": "application/json"}
    t0 = time.perf_counter()
    with client.stream("POST", path, content=body, headers=headers) as resp:
        raw = _read_all(resp)
    elapsed = time.perf_counter() - t0
    _check(resp, raw)
    conv.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": _reply_of(kind, raw)}]
    return elapsed


def seed(client: httpx.Client, kind: str, conv: Conversation, size: int) -> None:
    """Bring the session to ``size`` messages through the public API, cheaply: one request per
    turn carrying only the new message (the native API; ``/api/chat`` without an id, whose
    earlier messages are only a window; ``X-Session-Id`` with the chat's name, the same session
    Open WebUI's header reaches).  Then the client holds the stored history, as a real one would."""
    while len(conv.messages) < size:
        conv.said += 1
        text = user_text(conv.said)
        if kind.startswith("native"):
            resp = client.post(f"/v1/sessions/{conv.key}/messages", json={"text": text})
            sid = conv.key
        elif kind.startswith("ollama"):
            resp = client.post("/api/chat", json={"model": conv.key, "stream": False,
                                                  "messages": [{"role": "user", "content": text}]})
            sid = resp.headers.get("x-session-id", "")
        else:
            resp = client.post("/v1/chat/completions", headers={"X-Session-Id": conv.key},
                               json={"model": "bench", "messages": [{"role": "user", "content": text}]})
            sid = resp.headers.get("x-session-id", "")
        _check(resp, resp.content)
        conv.messages.append({"role": "user", "content": text})
        conv.messages.append({"role": "assistant", "content": ""})  # filled from the stored history below
    got = client.get(f"/v1/sessions/{sid}")
    _check(got, got.content)
    conv.messages = [{"role": m["role"], "content": m["content"]} for m in got.json()["history"]]
    if len(conv.messages) != size:
        raise RuntimeError(f"{kind}: seeded {len(conv.messages)} messages, wanted {size}")


KINDS = ["native", "native stream", "ollama", "ollama stream", "openai", "openai stream"]


def overhead(folder: Path, sizes: list[int], requests: int, per_session: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with serve(folder, "--backend", "fake", "--max-open", "4096", "--keep-open", "600") as url, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as client:
        for size in sizes:
            pool = max(1, -(-requests // per_session))
            convs: dict[str, list[Conversation]] = {}
            t0 = time.monotonic()
            for kind in KINDS:
                convs[kind] = []
                for j in range(pool):
                    if kind.startswith("native"):
                        key = client.post("/v1/sessions").json()["session_id"]
                    else:
                        key = f"bench-{kind.split()[0]}-{size}-{j}-{'s' if kind.endswith('stream') else 'w'}"
                    conv = Conversation(key)
                    seed(client, kind, conv, size)
                    convs[kind].append(conv)
            log(f"  {size} messages: seeded {pool} session(s) per row in {time.monotonic() - t0:.1f} s")
            times: dict[str, list[float]] = {k: [] for k in KINDS}
            said = 10**6
            for i in range(requests):
                conv_index = i // per_session
                for kind in KINDS:
                    said += 1
                    times[kind].append(send(client, kind, convs[kind][conv_index], user_text(said)))
            out[str(size)] = {k: {"p50_ms": pct(v, 0.5) * 1000, "p99_ms": pct(v, 0.99) * 1000,
                                  "mean_ms": statistics.fmean(v) * 1000, "n": len(v),
                                  "body_kb": len(request_of(k, convs[k][-1], user_text(0))[2]) / 1024}
                              for k, v in times.items()}
            log(f"  {size} messages: {requests} requests per row done")
    return out


def overhead_table(res: dict[str, Any], per_session: int) -> str:
    rows = ["| way in (client's shape) | history | request body | p50 | p99 | overhead p50 | overhead p99 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind in KINDS:
        for size, cells in res.items():
            c = cells[kind]
            base = cells["native stream" if kind.endswith("stream") else "native"]
            extra = ("—", "—") if kind.startswith("native") else (
                f"{c['p50_ms'] - base['p50_ms']:+.2f} ms", f"{c['p99_ms'] - base['p99_ms']:+.2f} ms")
            n = int(size)
            rows.append(f"| {overhead_label(kind)} | {n:,}-{n + 2 * per_session:,} | {c['body_kb']:.1f} KB | "
                        f"{c['p50_ms']:.2f} ms | {c['p99_ms']:.2f} ms | {extra[0]} | {extra[1]} |")
    return "\n".join(rows)


# -- 2. the embedded model: second request warm vs cold ---------------------------------------------
def first_token(client: httpx.Client, sid: str, system: str, messages: list[dict[str, str]]
                ) -> tuple[float, int, str]:
    """(first-token time, prompt tokens computed, reply) of one streamed ``/api/chat``."""
    body = json.dumps({"model": "assistant", "stream": True, "options": {"temperature": 0},
                       "messages": [{"role": "system", "content": system}, *messages]}).encode()
    t0 = time.perf_counter()
    ttft: float | None = None
    text = ""
    computed = -1
    with client.stream("POST", "/api/chat", content=body,
                       headers={"X-Session-Id": sid, "Content-Type": "application/json"}) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"/api/chat: {resp.status_code} {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.strip():
                continue
            part = json.loads(line)
            if "error" in part:
                raise RuntimeError(part["error"])
            piece = part.get("message", {}).get("content", "")
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += piece
            if part.get("done"):
                computed = int(part.get("prompt_eval_count", -1))
    return (ttft if ttft is not None else time.perf_counter() - t0), computed, text


def embedded(folder: Path, pairs: int) -> dict[str, Any]:
    rows: dict[str, list[tuple[float, int]]] = {"warm": [], "cold": [], "warm, time line changed": []}
    system = "You are a helpful voice assistant in a home. Current time is {}. Today's date is 2026-12-06."
    with serve(folder, "--backend", "llama-cpp", "--max-tokens", "16", "--timeout", "0") as url, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300) as client:
        for i in range(pairs):
            first = [{"role": "user", "content": f"Hello, my name is Sam and I live in room {i}."}]
            second_q = {"role": "user", "content": "What should I cook for dinner tonight?"}
            # The three start alike; the order rotates so that none always runs first.
            order = list(rows)[i % 3:] + list(rows)[:i % 3]
            for row in order:
                sid = f"bench-embedded-{row.split(',')[0]}-{i}-{os.urandom(3).hex()}"
                if row == "cold":
                    # The same second request as the warm row's, to a session that has never seen it.
                    _, _, reply = first_token(client, f"prep-{sid}", system.format("08:00"), first)
                    ttft, computed, _ = first_token(client, sid, system.format("08:00"),
                                                    [*first, {"role": "assistant", "content": reply}, second_q])
                else:
                    _, _, reply = first_token(client, sid, system.format("08:00"), first)
                    later = "08:01" if row != "warm" else "08:00"
                    ttft, computed, _ = first_token(client, sid, system.format(later),
                                                    [*first, {"role": "assistant", "content": reply}, second_q])
                rows[row].append((ttft, computed))
            log(f"  pair {i + 1}/{pairs}: " + ", ".join(f"{k} {v[-1][0] * 1000:.0f} ms ({v[-1][1]} computed)"
                                                       for k, v in rows.items()))
    return {k: {"ttft_p50_ms": pct([t for t, _ in v], 0.5) * 1000, "ttft_p99_ms": pct([t for t, _ in v], 0.99) * 1000,
                "computed_median": statistics.median(c for _, c in v), "n": len(v)} for k, v in rows.items()}


def embedded_table(res: dict[str, Any]) -> str:
    warm = res["warm"]["ttft_p50_ms"]
    rows = ["| second request of a conversation | first token p50 | p99 (max when n < 100) | prompt tokens computed "
            "(median) | vs warm |", "| --- | ---: | ---: | ---: | ---: |"]
    for k, v in res.items():
        rows.append(f"| {k} | {v['ttft_p50_ms']:.0f} ms | {v['ttft_p99_ms']:.0f} ms | {v['computed_median']:.0f} | "
                    f"{v['ttft_p50_ms'] / warm:.1f}x |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs (seconds)")
    ap.add_argument("--sizes", default="10,1000", help="history sizes in messages (even numbers)")
    ap.add_argument("--requests", type=int, default=200, help="timed requests per row and size")
    ap.add_argument("--per-session", type=int, default=None,
                    help="timed requests per session before the next one takes over (default: 5 at 10, 100 beyond)")
    ap.add_argument("--pairs", type=int, default=10, help="embedded model: conversations per row")
    ap.add_argument("--no-embedded", action="store_true", help="skip the embedded model's part")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.smoke:
        sizes, args.requests, args.pairs = [4, 40], 6, 1
    if any(s % 2 for s in sizes):
        ap.error("--sizes: even numbers (whole turns)")
    started = time.monotonic()
    load0 = os.getloadavg()[0]
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, Python {platform.python_version()}, "
                                         f"{platform.platform()}"}
    with tempfile.TemporaryDirectory(prefix="bench-compat-") as tmp:
        folder = Path(tmp)
        print("### Per-request overhead: the compat endpoints vs the native API (fake backend, no delay)\n")
        tables = []
        for size in sizes:
            per = args.per_session or (5 if size <= 100 else 100)
            per = min(per, args.requests)
            log(f"overhead at {size} messages ({args.requests} requests per row, {per} per session)")
            res = overhead(folder, [size], args.requests, per)
            report.setdefault("overhead", {}).update(res)
            tables.append(overhead_table(res, per))
        # One table, rows grouped by way in.
        header, rule = tables[0].splitlines()[:2]
        body = [line for t in tables for line in t.splitlines()[2:]]
        body.sort(key=lambda line: next(i for i, k in enumerate(KINDS)
                                    if line.startswith(f"| {overhead_label(k)} |")))
        print("\n".join([header, rule, *body]) + "\n")
        if not args.no_embedded:
            log(f"embedded model: {args.pairs} conversation(s) per row")
            res2 = embedded(folder, args.pairs)
            report["embedded"] = res2
            print("### First token of a conversation's second request, embedded model (`/api/chat`, streamed)\n")
            print(embedded_table(res2) + "\n")
    load1 = os.getloadavg()[0]
    report["load_average"] = [round(load0, 2), round(load1, 2)]
    report["took_s"] = round(time.monotonic() - started, 1)
    print(f"Machine: {report['machine']}; load average {load0:.2f} -> {load1:.2f}; run took {report['took_s']} s.")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def overhead_label(kind: str) -> str:
    return {"native": "native `POST .../messages`", "native stream": "native, streamed (SSE)",
            "ollama": "Ollama `/api/chat` (Home Assistant)",
            "ollama stream": "Ollama `/api/chat` streamed (Home Assistant)",
            "openai": "OpenAI `/v1/chat/completions` (Open WebUI)",
            "openai stream": "OpenAI `/v1/chat/completions` streamed (Open WebUI)"}[kind]


if __name__ == "__main__":
    raise SystemExit(main())
