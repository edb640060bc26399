"""Server-side tools over a real ``serve`` process: ``--tools-file`` with a counting tool (one
line appended to a file per run), the fake backend scripted by the ``!call`` convention, the
calls in the turn's JSON, and ``tool_call``/``tool_result`` events on the SSE stream and the
WebSocket, in order, between the pieces of the rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from test_service import ROOT, TOKEN_A, ServiceProcess, auth, service, sse_events

TOOLS = '''
import os

LOG = os.environ["COUNT_LOG"]


def set_light(room: str, on: bool) -> str:
    """Switch a room's light.

    Args:
        room: the room's name
        on: true to switch it on
    """
    with open(LOG, "a") as f:
        f.write(f"{room} {on}\\n")
    return f"{room} is {'on' if on else 'off'}"


def broken() -> str:
    """Always fails."""
    raise RuntimeError("the bulb is gone")
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Path]]:
    base = tmp_path_factory.mktemp("svc-tools")
    tools = base / "house.py"
    tools.write_text(TOOLS)
    log = base / "runs.log"
    with service(base / "sessions", "--token", TOKEN_A, "--tools-file", str(tools), "--rate", "1000",
                 "--burst", "1000", env={"COUNT_LOG": str(log)}) as proc:
        yield proc, log


@pytest.fixture
def client(server: tuple[ServiceProcess, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0].url, headers=auth(TOKEN_A), timeout=30) as c:
        yield c


def runs(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_a_turn_runs_the_tool_once_and_returns_its_calls(server: tuple[ServiceProcess, Path],
                                                          client: httpx.Client) -> None:
    _, log = server
    before = len(runs(log))
    sid = client.post("/v1/sessions").json()["session_id"]
    body = client.post(f"/v1/sessions/{sid}/messages",
                       json={"text": '!call set_light {"room": "kitchen", "on": true}'}).json()
    assert runs(log)[before:] == ["kitchen True"]
    [call] = body["tool_calls"]
    assert call["name"] == "set_light" and call["arguments"] == {"room": "kitchen", "on": True}
    assert call["result"] == "kitchen is on" and call["id"].startswith("call_")
    assert body["response"] == "Done: set_light → kitchen is on."
    assert body["turn"] == 1
    # The history holds the call and its result; an ordinary message makes no call.
    history = client.get(f"/v1/sessions/{sid}").json()
    assert [m["role"] for m in history["history"]] == ["user", "assistant", "tool", "assistant"]
    plain = client.post(f"/v1/sessions/{sid}/messages", json={"text": "hello"}).json()
    assert "tool_calls" not in plain and len(runs(log)) == before + 1


def test_sse_stream_has_call_and_result_events_in_order(server: tuple[ServiceProcess, Path],
                                                        client: httpx.Client) -> None:
    _, log = server
    before = len(runs(log))
    sid = client.post("/v1/sessions").json()["session_id"]
    text = '!call set_light {"room": "hall", "on": false}\n!call broken {}'
    with client.stream("POST", f"/v1/sessions/{sid}/messages", json={"text": text, "stream": True}) as resp:
        events = list(sse_events(resp.iter_lines()))
    kinds = [k for k, _ in events]
    assert kinds[:4] == ["tool_call", "tool_result", "tool_call", "tool_result"], kinds
    assert kinds[-1] == "done" and set(kinds[4:-1]) == {"piece"}
    call, result, call2, result2 = (d for _, d in events[:4])
    assert call == {"id": result["id"], "name": "set_light", "arguments": {"room": "hall", "on": False}}
    assert result["result"] == "hall is off"
    assert call2["name"] == "broken" and result2["error"] == "error: RuntimeError: the bulb is gone"
    done = events[-1][1]
    assert [c["name"] for c in done["tool_calls"]] == ["set_light", "broken"]  # type: ignore[index]
    assert runs(log)[before:] == ["hall False"]


def test_a_detached_turn_and_its_followers_get_the_call_and_result_events(server: tuple[ServiceProcess, Path],
                                                                           client: httpx.Client) -> None:
    """The web page's turns are detached: their stream, and ``GET .../live`` (a reloaded tab
    following the turn), carry the calls in their place among the pieces."""
    _, log = server
    before = len(runs(log))
    sid = client.post("/v1/sessions").json()["session_id"]
    text = '!call set_light {"room": "porch", "on": true}'
    with client.stream("POST", f"/v1/sessions/{sid}/messages",
                       json={"text": text, "stream": True, "detach": True}) as resp:
        events = list(sse_events(resp.iter_lines()))
    kinds = [k for k, _ in events]
    assert kinds[:3] == ["start", "tool_call", "tool_result"], kinds
    assert kinds[-1] == "done" and set(kinds[3:-1]) == {"piece"}, kinds
    assert events[1][1]["arguments"] == {"room": "porch", "on": True} and events[2][1]["result"] == "porch is on"
    assert runs(log)[before:] == ["porch True"]  # followed, never run again


def test_websocket_has_call_and_result_events(server: tuple[ServiceProcess, Path], client: httpx.Client) -> None:
    proc, log = server
    before = len(runs(log))
    sid = client.post("/v1/sessions").json()["session_id"]
    url = proc.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/ws"
    with connect(url, additional_headers=auth(TOKEN_A), open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"
        ws.send(json.dumps({"type": "message", "text": '!call set_light {"room": "attic", "on": true}'}))
        seen = []
        while not seen or seen[-1]["type"] not in ("done", "error"):
            seen.append(json.loads(ws.recv(timeout=10)))
    kinds = [e["type"] for e in seen]
    assert kinds[:2] == ["tool_call", "tool_result"], kinds
    assert kinds[-1] == "done" and seen[-1]["tool_calls"][0]["result"] == "attic is on"
    assert seen[1]["result"] == "attic is on" and seen[0]["arguments"] == {"room": "attic", "on": True}
    assert runs(log)[before:] == ["attic True"]


def test_a_bad_tools_file_is_refused_before_listening(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import nonexistent_module_xyz\n")
    out = subprocess.run([sys.executable, "-m", "conversation_session.service", "--backend", "fake",
                          "--sessions-dir", str(tmp_path / "s"), "--port", "1", "--tools-file", str(bad)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert "--tools-file" in out.stderr and "ModuleNotFoundError" in out.stderr
