"""The terminal app's ``--memory summary`` (the ``memory`` command, the notices, ``stats``) and
``serve`` (the session service started through the app's own command)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conversation_session import FakeBackend, HistoryStore
from conversation_session.cli._args import parse_args
from conversation_session.cli._chat import ChatApp
from conversation_session.cli._commands import parse_line
from test_memory_summary import Summarizer

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def chat(lines: list[str], *flags: str, backend: FakeBackend | None = None,
         summarizer: FakeBackend | None = None) -> tuple[int, str, str, ChatApp]:
    args = parse_args(["--backend", "fake", *flags])
    out, err = io.StringIO(), io.StringIO()
    app = ChatApp(args, stdin=io.StringIO("".join(line + "\n" for line in lines)), stdout=out, stderr=err,
                  interactive=False, backend=backend or FakeBackend(), summarizer=summarizer)
    status = app.run()
    return status, out.getvalue(), err.getvalue(), app


class _Paced(FakeBackend):
    """Gives the background summary time to be made between turns (the app does not wait for it)."""

    def generate(self, request):
        time.sleep(0.02)
        yield from super().generate(request)


def test_memory_summary_the_memory_command_the_notice_and_stats(sessions_dir):
    facts = [f"fact {i} is {i * 7}" for i in range(80)]
    summarizer = Summarizer()
    status, out, err, app = chat(["memory", *facts, "memory", "/memory", "stats"], "--memory", "summary",
                                 "--max-tokens", "10", backend=_Paced(context_length=400), summarizer=summarizer)
    assert status == 0, err
    assert app.summary is not None and app.summary["memory"] == "summary"
    first, second, third = out.split("🧠 ")[1:4]
    assert first.startswith("no summary yet: all 0 turn(s) fit the context window")
    summarized = app.summary["summarized_turns"]
    assert summarized > 0 and second.startswith(f"summary of the first {summarized} turn(s)")
    assert "fact 0 is 0" in second  # the summary's text: the earliest fact survives in it
    assert third.split("📊")[0] == second  # bare word and slash form are the same command
    assert re.search(rf"memory +summary: {summarized} turn\(s\) summarised, \d+ verbatim", out)
    assert re.search(r"summary +\d+ tokens, [1-9]\d* compaction\(s\) this run", out)
    assert "are now carried by a running summary" in err or "in the running summary so far" in err
    # The summary is saved with the session and comes back on resume without being recomputed.
    sid = app.summary["session_id"]
    assert HistoryStore(sessions_dir).load(sid).summary is not None
    calls = summarizer.calls
    _, out, _, _ = chat([f"/resume {sid}", "memory"], "--memory", "summary", summarizer=summarizer)
    assert f"summary of the first {summarized} turn(s)" in out and summarizer.calls == calls


def test_memory_trim_says_so_and_the_flag_comes_from_the_config_file(sessions_dir, tmp_path):
    _, out, _, _ = chat(["hello", "memory", "stats"])
    assert "memory is trim" in out and "--memory summary" in out
    assert re.search(r"memory +trim", out)
    assert parse_line("memory", lambda _: False).kind == "command"
    assert parse_line("memory of my grandmother", lambda _: False).kind == "message"
    config = tmp_path / "xdg" / "conversation-session" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('memory = "summary"\n')
    assert parse_args([]).memory == "summary"
    _, out, _, app = chat(["memory"])
    assert "no summary yet" in out and app.summary["memory"] == "summary"
    assert parse_args(["--memory", "trim"]).memory == "trim"
    config.write_text('memory = "everything"\n')
    proc = subprocess.run([sys.executable, str(MAIN), "hi"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "memory must be one of trim, summary" in proc.stderr


# -- serve ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_runs_the_session_service_with_its_own_flags(sessions_dir):
    help_text = subprocess.run([sys.executable, str(MAIN), "serve", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=ROOT)
    assert help_text.returncode == 0 and "--workers" in help_text.stdout and "--token" in help_text.stdout
    assert "serve" in subprocess.run([sys.executable, str(MAIN), "--help"], capture_output=True, text=True,
                                     timeout=60, cwd=ROOT).stdout
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(MAIN), "serve", "--backend", "fake", "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.communicate()[1]
                time.sleep(0.2)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/sessions", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            sid = json.loads(r.read())["session_id"]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/sessions/{sid}/messages", method="POST",
                                         data=json.dumps({"text": "hello service"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert json.loads(r.read())["response"] == "Reply 1: hello service"
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 0
    # Saved by the service in the sessions folder of the environment, as the chat would.
    (info,) = HistoryStore(sessions_dir).list_sessions()
    assert info.first_user_line == "hello service" and info.turns == 1


def test_serve_without_the_service_extra_is_one_line_saying_what_to_install(sessions_dir):
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('starlette', 'uvicorn', 'websockets'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from conversation_session.cli import main\n"
        "sys.exit(main(['serve', '--backend', 'fake']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "pip install 'conversation-session[service]'" in proc.stderr
