"""``--approve``: the chat app asks y/N before each call of a tool not marked idempotent, on a
real terminal (pexpect, ``main.py --backend fake`` following the ``!call`` convention); piped,
with nobody to ask, such calls are refused and the model gets ``error: not approved``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect

from conversation_session import HistoryStore

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "您:"

TOOLS = '''
import os
from conversation_session import tool

LOG = os.environ["COUNT_LOG"]


def set_light(room: str, on: bool) -> str:
    """Switch a room's light."""
    with open(LOG, "a") as f:
        f.write(room + "\\n")
    return "ok"


@tool(idempotent=True)
def light_state(room: str) -> str:
    """Whether a room's light is on."""
    with open(LOG, "a") as f:
        f.write("state " + room + "\\n")
    return "off"
'''


def setup(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    tools = tmp_path / "house.py"
    tools.write_text(TOOLS)
    log = tmp_path / "runs.log"
    env = {**os.environ, "COUNT_LOG": str(log), "CONVERSATION_SESSIONS_DIR": str(tmp_path / "sessions"),
           "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    return tools, log, env


def runs(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_approve_asks_on_a_terminal_and_runs_only_what_was_approved(tmp_path: Path) -> None:
    tools, log, env = setup(tmp_path)
    child = pexpect.spawn(sys.executable, [str(ROOT / "main.py"), "--backend", "fake", "--tools-file", str(tools),
                                           "--approve"], cwd=str(ROOT), env=env, encoding="utf-8", timeout=30,
                          dimensions=(40, 200))
    try:
        child.expect(PROMPT)
        child.sendline('!call set_light {"room": "kitchen", "on": true}')
        child.expect(r"run set_light\(room='kitchen', on=True\)\? \[y/N\]")
        child.sendline("y")
        child.expect(r"set_light\(room='kitchen', on=True\) ✓ approved → ok")
        child.expect(PROMPT)
        assert runs(log) == ["kitchen"]
        child.sendline('!call set_light {"room": "hall", "on": true}')
        child.expect(r"\[y/N\]")
        child.sendline("n")
        child.expect(r"set_light\(room='hall', on=True\) → error: not approved: the user answered no")
        child.expect(PROMPT)
        # An idempotent tool is not asked about.
        child.sendline('!call light_state {"room": "hall"}')
        child.expect(r"light_state\(room='hall'\) → off")
        child.expect(PROMPT)
        assert runs(log) == ["kitchen", "state hall"]
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    store = HistoryStore(tmp_path / "sessions")
    record = store.load(store.list_sessions()[0].session_id)
    refused = [m for m in record.messages if m["role"] == "tool" and "not approved" in m["content"]]
    assert len(refused) == 1 and record.turns == 3


def test_approve_refuses_when_piped_and_the_model_is_told(tmp_path: Path) -> None:
    tools, log, env = setup(tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "--backend", "fake", "--tools-file", str(tools),
                          "--approve"], input='!call set_light {"room": "kitchen", "on": true}\n',
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert runs(log) == []  # never run
    assert "set_light(room='kitchen', on=True) → error: not approved: no terminal to ask on" in out.stderr
    assert out.stdout.startswith("Done: set_light → error: not approved")  # what the model was given
