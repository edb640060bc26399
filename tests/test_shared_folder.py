"""The chat and the service on one sessions folder, both running, as a new user tries them:
``python main.py serve`` in one terminal, ``python main.py`` in another.

* One id: a service session's file is named after the id the API shows, so the API, the
  folder, ``sessions list`` and the chat's ``/resume`` all say the same id, with the same
  ``created_at``.
* ``-c`` while the service holds the newest session continues an older one and says which, and
  why the newest was passed over (held by the service, process N).
* A session the chat holds: the service's 409 names the chat's process, not "another worker".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from conversation_session import HistoryStore
from test_service import service

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"


def app(*args: str, input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(MAIN), *args], input=input, capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=dict(os.environ))


def test_a_service_session_has_one_id_in_the_api_the_folder_and_the_chat(sessions_dir: Path) -> None:
    with service(sessions_dir) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/messages", json={"text": "remember the blue door"}).json()["turn"] == 1
        shown = c.get(f"/v1/sessions/{sid}").json()
        cid = c.post("/api/conversation/process", json={"text": "hello"}).json()["conversation_id"]
        listed = {s["session_id"]: s for s in c.get("/v1/sessions").json()["sessions"]}
    record = HistoryStore(sessions_dir).load(sid)  # the file is named after the API's id
    assert shown["store_session_id"] == sid and (sessions_dir / f"{sid}.json").exists()
    assert shown["created_at"] == record.created_at == listed[sid]["created_at"]
    assert (sessions_dir / f"{cid}.json").exists()  # Home Assistant's conversations too
    rows = json.loads(app("sessions", "list", "--json").stdout)
    assert {r["session_id"] for r in rows} == {sid, cid}
    assert next(r for r in rows if r["session_id"] == sid)["created_at"] == shown["created_at"]
    # The chat continues it by the same id, and the service then sees the chat's turn.
    again = app("--backend", "fake", "--resume", sid, "what door?")
    assert again.returncode == 0, again.stderr
    with service(sessions_dir) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        history = c.get(f"/v1/sessions/{sid}").json()["history"]
    assert [m["content"] for m in history[::2]] == ["remember the blue door", "what door?"]


def test_continue_says_which_session_goes_on_while_the_service_holds_the_newest(sessions_dir: Path) -> None:
    first = app("--backend", "fake", "my name is Xiaoming")
    assert first.returncode == 0, first.stderr
    (older,) = [i.session_id for i in HistoryStore(sessions_dir).list_sessions()]
    with service(sessions_dir) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/messages", json={"text": "the kitchen light"}).json()["turn"] == 1
        assert HistoryStore(sessions_dir).newest_first()[0] == sid  # the service's is the newest
        # -c: the service keeps its session open (--keep-open), so the older one goes on, and
        # the user (or the script, in one-shot mode) is told which, and why not the newest.
        piped = app("--backend", "fake", "-c", input="history\n")
        one_shot = app("--backend", "fake", "-c", "hello again")
    why = f"the newer {sid} is open in the session service (process {srv.proc.pid})"
    assert f"✅ resumed {older}: 1 turn(s); {why}" in piped.stderr
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout.startswith("Reply ")
    assert f"continuing {older} (1 turn(s)); {why}" in one_shot.stderr
    assert HistoryStore(sessions_dir).load(older).turns == 2 and HistoryStore(sessions_dir).load(sid).turns == 1


def test_the_service_names_the_chat_that_holds_a_session(sessions_dir: Path) -> None:
    with service(sessions_dir, "--keep-open", "0", "--lock-wait", "0.5") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        assert c.post(f"/v1/sessions/{sid}/messages", json={"text": "first"}).json()["turn"] == 1
        # The chat continues the service's session (`/resume` of it) and stays open.
        chat = subprocess.Popen([sys.executable, str(MAIN), "--backend", "fake", "--resume", sid],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT)
        try:
            assert chat.stdin is not None and chat.stdout is not None
            chat.stdin.write("from the chat\n")
            chat.stdin.flush()
            assert chat.stdout.readline().startswith("Reply ")  # the chat holds the session now
            busy = c.post(f"/v1/sessions/{sid}/messages", json={"text": "from the speaker"})
            chat.stdin.close()
            assert chat.wait(30) == 0
        finally:
            if chat.poll() is None:
                chat.kill()
        assert busy.status_code == 409, busy.text
        message = busy.json()["error"]["message"]
        assert f"another program, process {chat.pid} (python main.py), not this service" in message, message
        assert "another worker" not in message
        # The chat has gone: the service goes on with the same conversation.
        after = c.post(f"/v1/sessions/{sid}/messages", json={"text": "from the speaker"}).json()
    assert after["turn"] == 3
