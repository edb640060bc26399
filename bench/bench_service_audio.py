"""Sentence audio over the service's WebSocket: what speech costs the text, and how soon each
sentence's WAV follows it.

A real server (``--tts``, espeak-ng, FakeBackend streaming a 6-sentence reply with
``--fake-delay`` per piece) and N concurrent WebSocket clients, each doing T turns, once with
``?audio=wav`` and once without.  Reports per turn: time to the first piece and to ``done``
(the text: it must not slow down with audio on), and per sentence the delay from its
``sentence`` event to its audio frame, plus time to first audio.

    .venv/bin/python bench/bench_service_audio.py
    .venv/bin/python bench/bench_service_audio.py --clients 8 --turns 5 --fake-delay 0.02
    .venv/bin/python bench/bench_service_audio.py --smoke     # 2 clients x 1 turn: proves it runs

Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The kitchen lights are on. It is twenty degrees inside. 明天会下雨。Shall I close the blinds? "
        "The oven timer has five minutes left. Anything else?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_client(url: str, audio: bool, turns: int, out: dict[str, list[float]]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        sid = (await http.post("/v1/sessions")).json()["session_id"]
    ws_url = url.replace("http://", "ws://") + f"/v1/sessions/{sid}/ws" + ("?audio=wav" if audio else "")
    async with connect(ws_url, max_size=None) as ws:
        json.loads(await ws.recv())
        for _ in range(turns):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "message", "text": TEXT}))
            sentence_at: list[float] = []
            first_piece = first_audio = None
            done = audio_ended = False
            while not (done and (audio_ended or not audio)):
                frame = await ws.recv()
                now = time.perf_counter()
                if isinstance(frame, bytes):
                    continue
                event = json.loads(frame)
                kind = event["type"]
                if kind == "piece" and first_piece is None:
                    first_piece = now - t0
                elif kind == "sentence":
                    sentence_at.append(now)
                elif kind == "audio":
                    if first_audio is None:
                        first_audio = now - t0
                    out["sentence_to_audio"].append(now - sentence_at[event["sentence"]])
                elif kind == "done":
                    out["done"].append(now - t0)
                    done = True
                elif kind == "audio_end":
                    audio_ended = True
                elif kind == "error":
                    raise RuntimeError(event)
            assert first_piece is not None
            out["first_piece"].append(first_piece)
            if first_audio is not None:
                out["first_audio"].append(first_audio)


async def run(url: str, audio: bool, clients: int, turns: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"first_piece": [], "done": [], "first_audio": [], "sentence_to_audio": []}
    await asyncio.gather(*(one_client(url, audio, turns, out) for _ in range(clients)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--fake-delay", type=float, default=0.02, help="seconds per streamed piece")
    p.add_argument("--smoke", action="store_true", help="2 clients x 1 turn: proves the script runs")
    args = p.parse_args()
    if args.smoke:
        args.clients, args.turns = 2, 1
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "conversation_session.service", "--backend", "fake", "--port", str(port),
               "--sessions-dir", os.path.join(tmp, "sessions"), "--tts", "--fake-delay", str(args.fake_delay),
               "--rate", "100000", "--burst", "100000", "--log-level", "WARNING"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 60
            while time.monotonic() < end:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                time.sleep(0.1)
            print(f"{args.clients} clients x {args.turns} turns, a {len(TEXT.split())}-word 6-sentence reply, "
                  f"{args.fake_delay * 1000:.0f} ms per piece, {os.cpu_count()} cores")
            print(f"{'':22} {'first piece p50/p99':>22} {'done p50/p99':>18} {'first audio p50/p99':>22} "
                  f"{'sentence→audio p50/p99':>24}")
            for audio in (False, True):
                r = asyncio.run(run(url, audio, args.clients, args.turns))

                def fmt(k: str, r: dict[str, list[float]] = r) -> str:
                    return f"{pct(r[k], 0.5) * 1000:.0f} / {pct(r[k], 0.99) * 1000:.0f} ms" if r[k] else "-"

                label = "with ?audio=wav" if audio else "text only"
                print(f"{label:22} {fmt('first_piece'):>22} {fmt('done'):>18} {fmt('first_audio'):>22} "
                      f"{fmt('sentence_to_audio'):>24}")
                if audio:
                    print(f"  audio frames: {len(r['sentence_to_audio'])} "
                          f"(mean sentence→audio {statistics.fmean(r['sentence_to_audio']) * 1000:.0f} ms)")
        finally:
            proc.terminate()
            proc.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
