"""The chat app without a model: commands vs messages, what goes to stdout and stderr, exit
statuses, Ctrl-C in a pipe, the start-up check, notices, escaping, one-shot mode, the config file.

The app runs in-process (``ChatApp`` with a ``FakeBackend``) where the test is about its logic,
and as a real process (``--backend fake``, or the Ollama-API test server) where the test is
about pipes, signals and exit statuses.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conversation_session import BackendError, ConversationSession, FakeBackend, HistoryStore
from conversation_session.cli._args import parse_args
from conversation_session.cli._chat import ChatApp, backend_options
from conversation_session.cli._commands import completions, parse_line
from conversation_session.cli._text import escape_controls, format_bytes, parse_size
from ollama_api_server import OllamaAPIServer

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    """The user's own config file must not change what these tests see."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def chat(lines: list[str], *flags: str, backend: FakeBackend | None = None,
         stdin: str | None = None) -> tuple[int, str, str, ChatApp]:
    """Run the app in-process on ``lines`` (piped mode); returns status, stdout, stderr, app."""
    args = parse_args(["--backend", "fake", *flags])
    text = stdin if stdin is not None else "".join(line + "\n" for line in lines)
    out, err = io.StringIO(), io.StringIO()
    app = ChatApp(args, stdin=io.StringIO(text), stdout=out, stderr=err, interactive=False,
                  backend=backend or FakeBackend())
    status = app.run()
    return status, out.getvalue(), err.getvalue(), app


def run(*args: str, input: str = "", timeout: float = 60, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(MAIN), *args], input=input, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def saved_messages(sessions_dir: Path) -> list[str]:
    store = HistoryStore(sessions_dir)
    return [m["content"] for info in store.list_sessions() for m in store.load(info.session_id).messages]


# -- 1. a command is a whole line ----------------------------------------------------------------
MESSAGES = ["help me write a poem", "clear up my confusion: what is my name?", "quit smoking tips please",
            "Exit strategies for startups?", "stats are boring", "resume writing tips", "history of Rome",
            "new ideas for dinner", "delete the last paragraph", "export controls in the EU", "set the table"]


def test_a_line_that_starts_with_a_command_word_is_a_message(sessions_dir):
    exists = {"session_1"}.__contains__
    for text in MESSAGES:
        parsed = parse_line(text, exists)
        assert (parsed.kind, parsed.text) == ("message", text), text
    for word in ("history", "stats", "clear", "help", "quit", "exit", "sessions", "new", "Quit", " stats "):
        parsed = parse_line(word, exists)
        assert parsed.kind == "command" and parsed.arg == "", word
    assert parse_line("resume session_1", exists).arg == "session_1"  # bare form: an existing id
    assert parse_line("resume session_2", exists).kind == "message"   # not an existing one
    assert parse_line("/resume session_2", exists).arg == "session_2"
    assert parse_line("/export session_1 out.md", exists).arg == "session_1 out.md"
    assert parse_line("\\history", exists).text == "history"
    assert parse_line("/frobnicate", exists).kind == "unknown"


def test_messages_that_start_with_command_words_reach_the_model_and_the_app_stays(sessions_dir):
    proc = run("--backend", "fake", input="".join(t + "\n" for t in MESSAGES) + "history\n")
    assert proc.returncode == 0, proc.stderr
    for n, text in enumerate(MESSAGES, 1):
        assert f"Reply {n}: {text}" in proc.stdout
    assert f"{len(MESSAGES)} turn(s)" in proc.stdout  # `history` alone still is the command
    assert saved_messages(sessions_dir)[::2] == MESSAGES


def test_bare_resume_with_an_existing_id_and_slash_forms(sessions_dir, tmp_path):
    _, _, _, first = chat(["first session"])
    old = first.session.session_id
    target = tmp_path / "out.md"
    status, out, err, _ = chat(["hello", f"resume {old}", "history", f"/export {old} {target}",
                                "/resume session_404", "resume session_404"])
    assert status == 0
    assert f"resumed {old}: 1 turn(s)" in err and "1 turn(s), 2 message(s)" in out
    assert target.read_text().startswith(f"# {old}")
    assert "no saved session session_404" in err  # the slash form tries it
    assert "Reply 2: resume session_404" in out    # the bare form with no such session is a message


# -- 2. piped mode is scriptable -----------------------------------------------------------------
def test_piped_replies_on_stdout_everything_else_on_stderr(sessions_dir):
    _, _, _, earlier = chat(["an earlier session"])
    proc = run("--backend", "fake", input="hello\n/nope\nclear\nsecond\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Reply 1: hello\nReply 2: second\n"
    assert f"An earlier session exists: {earlier.session.session_id}" in proc.stderr
    assert "unknown command /nope" in proc.stderr and "🧹 new session" in proc.stderr
    assert "saved 1 turn(s) in" in proc.stderr


def test_a_failed_turn_makes_the_exit_status_non_zero(sessions_dir):
    fake = FakeBackend()
    fake.enqueue("fine")
    fake.enqueue(BackendError("the server went away"))
    status, out, err, _ = chat(["one", "two", "three"], backend=fake)
    assert status == 1
    assert out == "fine\nReply 3: three\n"  # the chat went on after the failure
    assert err.count("❌") == 1 and "the server went away" in err


def test_a_turn_failing_on_a_real_server_exits_1(sessions_dir):
    server = OllamaAPIServer().start()
    try:
        server.fault = "http500"
        proc = run("--backend", "ollama", "--base-url", server.url, input="hello\n")
    finally:
        server.stop()
    assert proc.returncode == 1 and proc.stdout == ""
    assert "❌" in proc.stderr and "Traceback" not in proc.stderr


def test_one_sigint_ends_piped_mode_with_130_and_keeps_the_turns(sessions_dir):
    child = subprocess.Popen([sys.executable, str(MAIN), "--backend", "fake"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("remember me\n")
    child.stdin.flush()
    assert child.stdout.readline() == "Reply 1: remember me\n"
    child.send_signal(signal.SIGINT)  # stdin stays open: the app is waiting for the next line
    try:
        child.wait(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 130
    assert saved_messages(sessions_dir) == ["remember me", "Reply 1: remember me"]


# -- 3. the backend is checked at start ------------------------------------------------------------
class _Down(FakeBackend):
    def check(self, timeout: float = 5.0) -> None:
        self.checked = timeout
        raise BackendError("cannot connect to the test server; start it")


def test_a_backend_that_fails_its_check_stops_the_app_before_the_first_message(sessions_dir):
    backend = _Down()
    status, out, err, _ = chat(["hello"], backend=backend)
    assert status == 1 and out == ""
    assert err == "❌ cannot connect to the test server; start it\n"
    assert backend.checked <= 5 and backend.requests == []


def test_ollama_down_is_reported_at_start(sessions_dir):
    t0 = time.monotonic()
    proc = run("--backend", "ollama", "--base-url", "http://127.0.0.1:9", input="hello\n")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "cannot connect to Ollama at http://127.0.0.1:9" in proc.stderr and "ollama serve" in proc.stderr
    assert proc.stderr.count("\n") == 1 and time.monotonic() - t0 < 30


# -- 7. session content never drives the terminal --------------------------------------------------
def test_control_characters_are_shown_not_obeyed(sessions_dir):
    hostile = "hi \x1b]0;pwned\x07 \x1b[2J \x9b31m there"
    status, out, _, _ = chat([hostile, "history", "sessions"])
    assert status == 0
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert out.count("\\x1b]0;pwned\\x07") == 4  # the reply, history (both lines), the listing
    proc = run("sessions", "list")
    assert proc.returncode == 0 and "\x1b" not in proc.stdout and "\\x1b]0;pwned" in proc.stdout
    assert escape_controls("a\tb\nc\rd\x00") == "a\tb\nc\\x0dd\\x00"


# -- 9, 10, 11, 13, 14 ------------------------------------------------------------------------------
def test_the_markdown_export_holds_the_title_system_prompt_and_withdrawn_turns(sessions_dir, tmp_path):
    target = tmp_path / "trip.md"
    status, _, err, app = chat(["hello", "undo", "again", "/title Trip to Rome", f"/export {target}"],
                               "--system", "You are a pirate.")
    assert status == 0, err
    sid = app.session.session_id
    md = target.read_text()
    assert md.startswith("# Trip to Rome\n")  # the title, not the id, after a rename
    assert f"- session: {sid}" in md
    assert "## system prompt\n\nYou are a pirate.\n" in md
    body, _, withdrawn = md.partition("## withdrawn turns (undo, retry)")
    assert "## user\n\nagain" in body and "hello" not in body
    assert "(they were messages 1-2)" in withdrawn
    assert "#### user\n\nhello" in withdrawn and "#### assistant\n\nReply 1: hello" in withdrawn


def test_stats_after_clear_and_resume_show_no_figures_of_the_previous_session(sessions_dir):
    _, _, _, first = chat(["older one"])
    status, out, _, _ = chat(["a b c", "d e f", "stats", "clear", "stats", "g h", f"/resume {first.session.session_id}",
                              "stats"])
    assert status == 0
    before, after_clear, after_resume = out.split("📊 KV cache")[1:]
    assert re.search(r"session cache hits +\d+%", before)
    for block in (after_clear, after_resume):
        assert re.search(r"session cache hits +–", block)
        assert re.search(r"last prompt +– tokens, – from cache", block)


def test_trimming_is_one_clean_notice_not_a_log_line(sessions_dir):
    words = " ".join(["word"] * 20)
    status, out, err, _ = chat([words] * 6, "--max-tokens", "10", backend=FakeBackend(context_length=80))
    assert status == 0
    assert err.count("left out of what the model sees") >= 1
    assert "WARNING" not in err and "left out of the prompt" not in err
    assert out.count("Reply") == 6


def test_a_timeout_says_the_partial_reply_was_not_kept(sessions_dir):
    server = OllamaAPIServer(token_delay=0.05).start()
    try:
        proc = run("--backend", "ollama", "--base-url", server.url, "--timeout", "2",
                   input="hi\ntell me something long\nhistory\n")
    finally:
        server.stop()
    assert proc.returncode == 1  # a turn failed
    assert "timed out after 2 s; the partial reply above was not kept" in proc.stderr
    assert "1 turn(s), 2 message(s)" in proc.stdout


def test_kv_cache_max_sizes_and_byte_formatting():
    assert parse_size("200M") == 200 * 2**20 and parse_size("1G") == 2**30 and parse_size("512k") == 512 * 1024
    assert parse_size("1.5GB") == 3 * 2**29 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="200M"):
        parse_size("lots")
    assert [format_bytes(n) for n in (0, 1023, 1024, 22 * 2**20 + 2**19, 3 * 2**30)] == [
        "0 B", "1023 B", "1.0 KB", "22.5 MB", "3.0 GB"]
    assert parse_args(["--kv-cache-max", "200M"]).kv_cache_max == 200 * 2**20
    with pytest.raises(SystemExit):
        parse_args(["--kv-cache-max", "big"])


def test_kv_cache_max_reaches_the_session(sessions_dir):
    _, _, _, app = chat([], "--kv-cache-max", "200M")
    assert app.session.kv_cache_max_bytes == 200 * 2**20


def test_the_earlier_session_hint_appears_once_per_session(sessions_dir):
    chat(["first"])
    hints = [chat([])[2].count("An earlier session exists") for _ in range(3)]
    assert hints == [1, 0, 0]
    chat(["second"])  # a newer session: hinted once more
    assert [chat([])[2].count("An earlier session exists: session_") for _ in range(2)] == [1, 0]


# -- §9: the confirmation rule, the help text, the parser ----------------------------------------
def test_delete_in_a_pipe_needs_yes_like_the_housekeeping_command(sessions_dir):
    _, _, _, first = chat(["doomed"])
    old = first.session.session_id
    _, _, err, _ = chat([f"/delete {old}", "y"])
    assert "not confirmed: standard input is not a terminal" in err and "add --yes" in err
    assert old in [i.session_id for i in HistoryStore(sessions_dir).list_sessions()]
    assert "Reply 1: y" in chat([f"/delete {old}", "y"])[1]  # the stray "y" is a message, not an answer
    _, _, err, _ = chat([f"/delete {old} --yes"])
    assert f"deleted {old}" in err
    assert old not in [i.session_id for i in HistoryStore(sessions_dir).list_sessions()]


def test_help_text_has_one_source_and_no_flag_is_declared_twice():
    from conversation_session.cli._args import build_housekeeping_parser, build_parser
    from conversation_session.cli._commands import command_help

    assert all(line in build_parser().format_help() for line in command_help().splitlines())
    out = chat(["help"])[1]
    assert all(line in out for line in command_help().splitlines())
    for parser in (build_parser(), build_housekeeping_parser()):
        options = [o for a in parser._actions for o in a.option_strings]
        assert len(options) == len(set(options))


def test_global_flags_before_or_after_the_housekeeping_command(sessions_dir, tmp_path):
    chat(["listed"])
    other = tmp_path / "other"
    assert run("sessions", "list").stdout.count("listed") == 1
    assert "no saved sessions" in run("--sessions-dir", str(other), "sessions", "list").stdout
    assert "no saved sessions" in run("sessions", "list", "--sessions-dir", str(other)).stdout
    assert "no saved sessions" in run("--model", "sessions", "--sessions-dir", str(other), "sessions", "list").stdout


def test_doctor_names_each_file_once(sessions_dir):
    sessions_dir.mkdir()
    (sessions_dir / "session_1.json").write_text("{ not json")
    proc = run("doctor")
    assert proc.returncode == 1
    (line,) = [ln for ln in proc.stdout.splitlines() if "session_1.json" in ln]
    assert line.count("session_1.json") == 1, line


# -- one-shot, pipes, --continue ----------------------------------------------------------------------
def test_one_shot_answers_and_exits(sessions_dir):
    proc = run("--backend", "fake", "what", "is", "2+2")
    assert proc.returncode == 0 and proc.stdout == "Reply 1: what is 2+2\n" and proc.stderr == ""
    proc = run("--backend", "fake", "summarise this", input="line one\nline two\n")
    assert proc.stdout == "Reply 1: summarise this\n\nline one\nline two\n\n"
    assert "summarise this\n\nline one\nline two\n" in saved_messages(sessions_dir)


def test_continue_and_resume_in_one_shot_mode(sessions_dir):
    run("--backend", "fake", "my name is Xiaoming")
    (sid,) = [i.session_id for i in HistoryStore(sessions_dir).list_sessions()]
    proc = run("--backend", "fake", "-c", "what is my name?")
    assert proc.returncode == 0 and proc.stdout == "Reply 1: what is my name?\n"
    assert HistoryStore(sessions_dir).load(sid).turns == 2
    proc = run("--backend", "fake", "--resume", sid, "and again")
    assert proc.returncode == 0 and HistoryStore(sessions_dir).load(sid).turns == 3
    missing = run("--backend", "fake", "--resume", "session_404", "hello")
    assert missing.returncode == 1 and "no saved session session_404" in missing.stderr
    assert run("--backend", "fake", "-c", "--resume", sid, "x").returncode == 2


def test_one_shot_failure_exits_1(sessions_dir):
    server = OllamaAPIServer().start()
    try:
        server.fault = "http500"
        proc = run("--backend", "ollama", "--base-url", server.url, "hello")
    finally:
        server.stop()
    assert proc.returncode == 1 and proc.stdout == "" and "❌" in proc.stderr


# -- the config file ----------------------------------------------------------------------------------
def test_config_file_sets_defaults_and_flags_win(sessions_dir, tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    (xdg / "conversation-session").mkdir(parents=True)
    config = xdg / "conversation-session" / "config.toml"
    config.write_text('backend = "fake"\nsystem = "You are terse."\nmax-tokens = 4\nverbose = true\n'
                      f'sessions_dir = "{tmp_path / "from_config"}"\nno_kv_file = true\n')
    args = parse_args([])
    assert (args.backend, args.system, args.max_tokens, args.verbose, args.persist_kv) == (
        "fake", "You are terse.", 4, True, False)
    args = parse_args(["--max-tokens", "9", "--system", "Be kind."])
    assert (args.max_tokens, args.system) == (9, "Be kind.")
    # The environment's sessions folder (the tests') comes before the file's; the flag first of all.
    proc = run("hello there", "friend")
    assert proc.returncode == 0 and proc.stdout == "Reply 1: \n"  # fake and max_tokens 4 from the file
    assert "the 4-token limit" in proc.stderr
    assert "eval count" in proc.stderr  # verbose from the file
    assert saved_messages(sessions_dir)[0] == "hello there friend"
    env = {k: v for k, v in os.environ.items() if k != "CONVERSATION_SESSIONS_DIR"}
    proc = subprocess.run([sys.executable, str(MAIN), "hi"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=60)
    assert proc.returncode == 0 and list((tmp_path / "from_config").glob("session_*.json"))
    config.write_text('temprature = 0.2\n')
    bad = run("hi")
    assert bad.returncode == 2 and "unknown key 'temprature'" in bad.stderr and str(config) in bad.stderr
    config.write_text('max_tokens = "many"\n')
    assert run("hi").returncode == 2


def test_a_bad_config_file_is_one_line_without_the_usage_text(tmp_path, capsys):
    config = tmp_path / "xdg" / "conversation-session" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("temprature = 0.2\n")
    with pytest.raises(SystemExit) as stopped:
        parse_args(["hello"], {"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith("conversation-session: error: config file ") and "unknown key 'temprature'" in err


@pytest.mark.parametrize("words", [["sessions", "list"], ["--backend", "fake", "hello"]])
def test_a_reader_that_goes_away_ends_the_output_quietly(sessions_dir, words):
    """``sessions list | head -3``: once the reader has gone, the app stops without an
    "error: Broken pipe" line or a traceback (exit status 1, as Python's own advice has it)."""
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir) as s:
        s.chat("one")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first line is written
    try:
        proc = subprocess.run([sys.executable, str(MAIN), *words], stdin=subprocess.DEVNULL, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT)
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == "", proc.stderr


# -- sampling flags, --verbose, /set, multi-line, completion ------------------------------------------
def test_sampling_flags_go_where_the_backend_takes_them():
    pytest.importorskip("llama_cpp")
    options, ignored = backend_options(parse_args(["--top-k", "20", "--top-p", "0.9", "--repeat-penalty", "1.2",
                                                   "--threads", "1", "--seed", "7", "--context-length", "2048"]))
    assert options["top_k"] == 20 and options["top_p"] == 0.9 and options["repeat_penalty"] == 1.2
    assert options["n_threads"] == 1 and options["n_ctx"] == 2048
    assert ("--seed" in ignored) == ("seed" not in options)
    options, ignored = backend_options(parse_args(["--backend", "fake", "--top-k", "20"]))
    assert options == {} and ignored == ["--top-k"]


def test_kv_type_goes_to_the_embedded_backend_only():
    pytest.importorskip("llama_cpp")
    options, ignored = backend_options(parse_args(["--kv-type", "f16"]))
    assert options == {"kv_cache_type": "f16"} and ignored == []
    options, ignored = backend_options(parse_args(["--backend", "fake", "--kv-type", "q4_0"]))
    assert options == {} and ignored == ["--kv-type"]
    with pytest.raises(SystemExit):
        parse_args(["--kv-type", "q3"])


def test_ignored_sampling_flag_is_said_once(sessions_dir):
    _, _, err, _ = chat(["hi"], "--top-k", "20")
    assert err.count("--top-k is not supported by the fake backend; ignored") == 1


def test_set_changes_the_session_and_multi_line_messages(sessions_dir):
    fake = FakeBackend()
    lines = ["/set system You are a pirate.", "/set temperature 0.2", "/set max_tokens 3", "/set temperature hot",
             "/set colour red", '"""', "first line", "", "help", '"""', '"""one line"""', "/set"]
    status, out, err, app = chat(lines, backend=fake)
    assert status == 0
    assert app.session.temperature == 0.2 and app.session.max_tokens == 3
    assert fake.requests[0].messages[0] == {"role": "system", "content": "You are a pirate."}
    assert fake.requests[0].messages[-1]["content"] == "first line\n\nhelp"
    assert fake.requests[0].temperature == 0.2 and fake.requests[0].max_tokens == 3
    assert fake.requests[1].messages[-1]["content"] == "one line"
    assert "cannot set 'colour'" in err and "not a valid value" in err
    assert "system       You are a pirate." in out and "temperature  0.2" in out


def test_verbose_prints_timings_on_stderr(sessions_dir):
    _, out, err, _ = chat(["a b c"], "--verbose")
    assert out == "Reply 1: a b c\n"
    for name in ("total duration:", "prompt tokens:", "prompt eval rate:", "eval count:", "eval rate:"):
        assert name in err


def test_tab_completion_of_commands_and_session_ids():
    ids = ["session_10", "session_11", "session_2"]
    assert ("/resume", 3) in completions("/re", lambda: ids)
    assert [c for c, _ in completions("his", lambda: ids)] == ["history"]
    assert [c for c, _ in completions("/resume session_1", lambda: ids)] == ["session_10", "session_11"]
    assert [c for c, _ in completions("/set te", lambda: ids)] == ["temperature"]
    assert completions("hello there", lambda: ids) == []


def test_listings_show_the_kv_cache_file_size(sessions_dir):
    _, _, _, app = chat(["remember this"])
    sid = app.session.session_id
    (sessions_dir / f"{sid}.kv").write_bytes(b"\0" * (3 * 2**20))
    table = run("sessions", "list").stdout
    assert "KV" in table.splitlines()[0] and "3.0 MB" in table
    (row,) = json.loads(run("sessions", "list", "--json").stdout)
    assert row["kv_bytes"] == 3 * 2**20
    chat_table = chat(["sessions"])[1]  # the chat shows the same table as `sessions list`
    assert "KV" in chat_table and "3.0 MB" in chat_table


def test_the_log_file_keeps_what_the_notices_leave_out(sessions_dir, tmp_path):
    log = tmp_path / "chat.log"
    words = " ".join(["word"] * 15)
    proc = run("--backend", "fake", "--context-length", "60", "--max-tokens", "10", "--log-file", str(log),
               input=f"{words}\n" * 4)
    assert proc.returncode == 0, proc.stderr
    assert "left out of what the model sees" in proc.stderr and "WARNING" not in proc.stderr
    assert "WARNING" in log.read_text() and "left out of the prompt" in log.read_text()


def test_sigint_during_a_one_shot_reply_exits_130_and_saves_nothing_of_it(sessions_dir):
    server = OllamaAPIServer(token_delay=0.05).start()
    try:
        child = subprocess.Popen([sys.executable, str(MAIN), "--backend", "ollama", "--base-url", server.url,
                                  "tell me something long"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT)
        deadline = time.monotonic() + 30
        while not any(c.words_sent >= 5 for c in server.chats):  # the reply is streaming
            assert time.monotonic() < deadline and child.poll() is None, "the reply never started"
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        try:
            out, err = child.communicate(timeout=20)
        finally:
            child.kill()
    finally:
        server.stop()
    assert child.returncode == 130 and "interrupted: this reply was not saved" in err
    assert out == ""  # nothing of the cut reply reaches the script reading stdout
    assert saved_messages(sessions_dir) == []


def test_a_one_shot_timeout_writes_nothing_to_stdout_and_says_what_was_saved(sessions_dir):
    server = OllamaAPIServer(token_delay=0.05).start()
    try:
        first = run("--backend", "ollama", "--base-url", server.url, "hello")
        assert first.returncode == 0 and first.stdout.startswith("You said: hello")
        proc = run("--backend", "ollama", "--base-url", server.url, "--timeout", "1", "-c", "tell me something long")
    finally:
        server.stop()
    assert proc.returncode == 1
    assert proc.stdout == ""  # the partial reply ("word0 word1 ...") is not left for the script
    (sid,) = [i.session_id for i in HistoryStore(sessions_dir).list_sessions()]
    assert "timed out after 1 s (--timeout): no reply, nothing of it saved" in proc.stderr
    assert f"session {sid} keeps its 1 earlier turn(s) (--resume {sid} continues it)" in proc.stderr
    assert "carry on" not in proc.stderr  # the process is exiting
    assert HistoryStore(sessions_dir).load(sid).turns == 1


def test_an_unknown_model_exits_1_with_what_to_do(sessions_dir):
    server = OllamaAPIServer().start()
    try:
        piped = run("--backend", "ollama", "--base-url", server.url, "--model", "llama9:70b", input="hello\n")
        one_shot = run("--backend", "ollama", "--base-url", server.url, "--model", "llama9:70b", "hello")
    finally:
        server.stop()
    for proc in (piped, one_shot):
        assert proc.returncode == 1 and proc.stdout == ""
        assert "ollama pull llama9:70b" in proc.stderr and "Traceback" not in proc.stderr
