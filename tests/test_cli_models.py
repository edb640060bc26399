"""``/model NAME`` (the same conversation goes on on another model), ``/models`` and the
``models`` command: against the Ollama-API test server, llama-cpp-python's OpenAI-compatible
server, and the embedded backend's local GGUF files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from conversation_session import HistoryStore
from ollama_api_server import OllamaAPIServer
from test_openai_backend import llama_server  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"
PROMPT = "您:"


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def ollama():
    server = OllamaAPIServer(models=("qwen2.5:3b", "llama3.2:1b")).start()
    yield server
    server.stop()


def warmups(server: OllamaAPIServer) -> list:
    return [c for c in server.chats if (c.body.get("options") or {}).get("num_predict") == 1]


def replies(server: OllamaAPIServer) -> list:
    return [c for c in server.chats if c not in warmups(server)]


def run(*args: str, input: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(MAIN), *args], input=input, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ))


def test_model_switches_the_model_for_the_rest_of_the_same_conversation(ollama, sessions_dir):
    lines = ["hello", "/model qwen2.5:3b", "/models", "/model llama3.2:1b", "again", "/model nosuch:7b", "third",
             "model", "history"]
    proc = run("--backend", "ollama", "--base-url", ollama.url, input="".join(x + "\n" for x in lines))
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err
    # The model in use, named: said so, not reloaded (no new session object, no second check).
    assert "qwen2.5:3b is already in use; nothing to switch" in err and "now on qwen2.5:3b" not in err
    # /models: both of the server's models, the one in use marked.
    assert "* qwen2.5:3b" in out and "  llama3.2:1b" in out
    assert "now on llama3.2:1b (ollama)" in err and "with its 1 turn(s) (was qwen2.5:3b)" in err
    # A model the server does not have: one clear error, and the current one goes on working.
    assert "ollama pull nosuch:7b" in err and "still on llama3.2:1b" in err
    assert "Traceback" not in err
    # Each turn went to the model in use then, with the whole conversation so far (the new
    # model was first warmed with the conversation, as after any resume).
    turns = replies(ollama)
    assert [c.body["model"] for c in turns] == ["qwen2.5:3b", "llama3.2:1b", "llama3.2:1b"]
    assert [len(c.body["messages"]) for c in turns] == [1, 3, 5]
    assert [(c.body["model"], len(c.body["messages"])) for c in warmups(ollama)] == [("llama3.2:1b", 2)]
    assert "You said: third. I remember 5 messages." in out
    assert "model: llama3.2:1b (ollama)" in out
    # One session, in one file, holding all three turns (the switch did not start another).
    store = HistoryStore(sessions_dir)
    (info,) = store.list_sessions()
    assert info.turns == 3 and "3 turn(s), 6 message(s)" in out
    assert [m["content"] for m in store.load(info.session_id).messages][::2] == ["hello", "again", "third"]


def test_model_switch_and_models_in_a_terminal(ollama, sessions_dir):
    child = pexpect.spawn(
        sys.executable, [str(MAIN), "--backend", "ollama", "--base-url", ollama.url], cwd=str(ROOT),
        env={**os.environ, "CONVERSATION_SESSIONS_DIR": str(sessions_dir), "TERM": "xterm",
             "PROMPT_TOOLKIT_NO_CPR": "1"},
        encoding="utf-8", timeout=30, dimensions=(40, 200))
    child.expect(PROMPT)
    child.sendline("hello")
    child.expect("I remember 1 messages")
    child.expect(PROMPT)
    child.send("/mode\t")  # Tab completes the new commands too
    child.expect("l")
    child.sendline("s")
    child.expect(r"\* qwen2\.5:3b")
    child.expect(PROMPT)
    child.send("/model lla\t")  # Tab completes the backend's model names
    child.expect(r"ma3\.2:1b")
    child.send("\r")
    child.expect(r"now on llama3\.2:1b")
    child.expect(PROMPT)
    child.sendline("go on")
    child.expect("You said: go on. I remember 3 messages.")
    child.expect(PROMPT)
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert [c.body["model"] for c in replies(ollama)] == ["qwen2.5:3b", "llama3.2:1b"]
    assert len(HistoryStore(sessions_dir).list_sessions()) == 1


def test_models_command_lists_ollama_tags_and_says_what_to_do_when_down(ollama):
    proc = run("models", "--backend", "ollama", "--base-url", ollama.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["  llama3.2:1b", "* qwen2.5:3b"]  # * the default, in use
    assert ("GET", "/api/tags") in ollama.requests
    proc = run("models", "--backend", "ollama", "--base-url", ollama.url, "--json")
    assert [row["name"] for row in json.loads(proc.stdout)] == ["llama3.2:1b", "qwen2.5:3b"]
    down = run("models", "--backend", "ollama", "--base-url", "http://127.0.0.1:9")
    assert down.returncode == 1 and down.stdout == ""
    assert "cannot reach Ollama at http://127.0.0.1:9" in down.stderr and "ollama serve" in down.stderr


def test_models_command_lists_an_openai_compatible_servers_models(llama_server):  # noqa: F811
    proc = run("--backend", "openai", "models", "--base-url", llama_server)
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split()
    assert any(word.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") for word in listed), proc.stdout


def test_models_for_the_embedded_backend_are_the_local_gguf_files(tmp_path):
    from conversation_session.backends._llama_cpp import bundled_model_path

    proc = run("models")
    assert proc.returncode == 0, proc.stderr
    bundled = bundled_model_path()
    assert f"* {bundled.stem}" in proc.stdout and str(bundled) in proc.stdout
    other = tmp_path / "mine.gguf"
    other.write_bytes(b"GGUF" + bytes(60))
    rows = json.loads(run("models", "--model", str(other), "--json").stdout)
    assert {r["name"] for r in rows} == {bundled.stem, "mine"}
    assert next(r for r in rows if r["name"] == "mine")["size_bytes"] == 64


@pytest.mark.model
def test_a_bad_model_file_keeps_the_embedded_model_working(sessions_dir):
    lines = ["hi", "/model /nonexistent/model.gguf", "and now?", "/model SmolLM2-135M-Instruct.Q4_1", "history"]
    proc = run("--max-tokens", "8", "--threads", "1", input="".join(x + "\n" for x in lines))
    assert proc.returncode == 0, proc.stderr
    assert "cannot switch to /nonexistent/model.gguf" in proc.stderr and "still on" in proc.stderr
    # Naming the bundled model, which is still the one in use: said, and not loaded again.
    assert "SmolLM2-135M-Instruct.Q4_1 is already in use; nothing to switch" in proc.stderr
    assert "now on" not in proc.stderr and "2 turn(s), 4 message(s)" in proc.stdout
    assert len(HistoryStore(sessions_dir).list_sessions()) == 1


def test_a_prompt_starting_with_models_is_a_message(ollama):
    proc = run("--backend", "fake", "models", "are", "great")
    assert proc.returncode == 0 and proc.stdout == "Reply 1: models are great\n"
    listed = run("--base-url", ollama.url, "models", "--backend", "ollama", "--json")  # flags only: the command
    assert listed.returncode == 0 and "qwen2.5:3b" in listed.stdout
