"""Sentence audio over the session WebSocket: a real server process started with ``--tts``, real
espeak-ng, the real ``websockets`` client asking for ``?audio=wav``."""

from __future__ import annotations

import io
import json
import os
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from conversation_session.speech import find_espeak
from test_service import LONG, TOKEN_A, ServiceProcess, auth, service, wait_for

pytestmark = pytest.mark.skipif(find_espeak() is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")


@pytest.fixture(scope="module")
def tmpdir_of_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-tmp")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tmpdir_of_server: Path) -> Iterator[ServiceProcess]:
    base = tmp_path_factory.mktemp("audio")
    # Its own TMPDIR: the test can see that no synthesis file is left behind.
    with service(base / "sessions", "--token", TOKEN_A, "--fake-delay", "0.02", "--rate", "1000",
                 "--burst", "1000", "--tts", "--tts-rate", "220",
                 env={"TMPDIR": str(tmpdir_of_server)}) as proc:
        yield proc


@pytest.fixture
def client(server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=auth(TOKEN_A), timeout=30) as c:
        yield c


def ws_url(server: ServiceProcess, sid: str, query: str = "?audio=wav") -> str:
    return server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/ws{query}"


def new_session(client: httpx.Client) -> str:
    sid: str = client.post("/v1/sessions").json()["session_id"]
    return sid


Event = dict[str, Any]


def recv(ws: ClientConnection, timeout: float = 15.0) -> Event | bytes:
    data = ws.recv(timeout=timeout)
    if isinstance(data, bytes):
        return data
    event: Event = json.loads(data)
    return event


def read_until(ws: ClientConnection, done: Any, timeout: float = 30.0) -> list[Event | bytes]:
    """Frames until ``done(seen)`` is true."""
    seen: list[Event | bytes] = []
    end = time.monotonic() + timeout
    while not done(seen):
        seen.append(recv(ws, max(end - time.monotonic(), 0.1)))
    return seen


def events(frames: list[Event | bytes], kind: str) -> list[Event]:
    return [f for f in frames if isinstance(f, dict) and f["type"] == kind]


def audio_pairs(frames: list[Event | bytes]) -> list[tuple[Event, bytes]]:
    """Each ``audio`` event with the binary frame that must follow it at once."""
    pairs = []
    for k, frame in enumerate(frames):
        if isinstance(frame, dict) and frame["type"] == "audio":
            data = frames[k + 1]
            assert isinstance(data, bytes), f"an audio event not followed by its binary frame: {frames[k + 1]!r}"
            pairs.append((frame, data))
    assert sum(isinstance(f, bytes) for f in frames) == len(pairs), "a binary frame without its audio event"
    return pairs


def wav_seconds(data: bytes) -> float:
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", data[:16]
    with wave.open(io.BytesIO(data)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        return w.getnframes() / w.getframerate()


def espeak_children(pid: int) -> list[int]:
    """espeak-ng processes whose parent is ``pid`` (other tests' espeak-ng do not count)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and name.startswith("espeak"):
            found.append(int(entry))
    return found


def no_files_left(folder: Path) -> None:
    """No synthesis folder (``cs-service-audio-*``) left in the server's TMPDIR (which also holds
    the hand-over socket's folder, alive while the server is)."""
    def audio_dirs() -> list[str]:
        return sorted(p.name for p in folder.glob("cs-service-audio-*"))
    try:
        wait_for(lambda: audio_dirs() == [], what="the audio folder to be removed")
    except AssertionError:
        raise AssertionError(f"left in the server's TMPDIR: {audio_dirs()}") from None


def test_each_sentence_gets_its_wav_in_order(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    with connect(ws_url(server, sid), additional_headers=auth(TOKEN_A), open_timeout=10) as ws:
        assert recv(ws) == {"type": "ready", "session_id": sid, "audio": "wav"}
        ws.send(json.dumps({"type": "message", "text": "Good morning. 今天天气很好。Mixed 中文 words! Bye."}))
        frames = read_until(ws, lambda seen: bool(events(seen, "audio_end")))
        done = events(frames, "done")
        assert len(done) == 1 and done[0]["turn"] == 1
        sentences = [e["text"] for e in events(frames, "sentence")]
        assert sentences == ["Reply 1: Good morning.", "今天天气很好。", "Mixed 中文 words!", "Bye."]
        # The text is not held back for the audio: every piece was sent before the last audio.
        pieces = [k for k, f in enumerate(frames) if isinstance(f, dict) and f["type"] == "piece"]
        audio_at = [k for k, f in enumerate(frames) if isinstance(f, dict) and f["type"] == "audio"]
        assert "".join(e["text"] for e in events(frames, "piece")) == done[0]["response"]
        assert max(pieces) < max(audio_at)
        pairs = audio_pairs(frames)
        assert [e["sentence"] for e, _ in pairs] == [0, 1, 2, 3]
        for event, data in pairs:
            assert event["format"] == "wav" and event["bytes"] == len(data)
            assert wav_seconds(data) > 0.3  # real speech, one WAV per sentence (both runs of "Mixed 中文 words!")
        # Sentence k's audio comes after sentence k's event.
        sentence_at = [k for k, f in enumerate(frames) if isinstance(f, dict) and f["type"] == "sentence"]
        assert all(s < a for s, a in zip(sentence_at, audio_at, strict=True))
        assert events(frames, "audio_end") == [{"type": "audio_end", "sentences": 4, "interrupted": False}]
        # A second turn numbers its sentences from 0 again.
        ws.send(json.dumps({"type": "message", "text": "Again."}))
        frames = read_until(ws, lambda seen: bool(events(seen, "audio_end")))
        assert [e["sentence"] for e, _ in audio_pairs(frames)] == [0]
    assert espeak_children(server.proc.pid) == []


def test_without_asking_there_is_no_audio(server: ServiceProcess, client: httpx.Client) -> None:
    sid = new_session(client)
    with connect(ws_url(server, sid, ""), additional_headers=auth(TOKEN_A), open_timeout=10) as ws:
        assert recv(ws) == {"type": "ready", "session_id": sid}
        ws.send(json.dumps({"type": "message", "text": "One. Two."}))
        frames = read_until(ws, lambda seen: bool(events(seen, "done")))
        ws.send(json.dumps({"type": "ping"}))
        frames += read_until(ws, lambda seen: bool(events(seen, "pong")))
    assert not any(isinstance(f, bytes) for f in frames)
    assert not events(frames, "audio") and not events(frames, "audio_end")
    with connect(ws_url(server, sid, "?audio=mp3"), additional_headers=auth(TOKEN_A), open_timeout=10) as ws:
        assert recv(ws) == {"type": "ready", "session_id": sid}
        error = recv(ws)
        assert isinstance(error, dict) and error["code"] == "bad_request" and "audio=wav" in error["message"]


def test_interrupt_stops_the_audio(server: ServiceProcess, client: httpx.Client, tmpdir_of_server: Path) -> None:
    sid = new_session(client)
    with connect(ws_url(server, sid), additional_headers=auth(TOKEN_A), open_timeout=10) as ws:
        recv(ws)
        ws.send(json.dumps({"type": "message", "text": LONG}))  # 201 sentences
        frames = read_until(ws, lambda seen: len(events(seen, "audio")) >= 2 and isinstance(seen[-1], bytes))
        ws.send(json.dumps({"type": "interrupt"}))
        frames += read_until(ws, lambda seen: bool(events(seen, "interrupted")))
        ends = events(frames, "audio_end")
        assert len(ends) == 1 and ends[0]["interrupted"] is True
        # Nothing of the stopped audio after the event that says so (and before it, every audio
        # event had its frame).
        end_at = next(k for k, f in enumerate(frames) if isinstance(f, dict) and f["type"] == "audio_end")
        assert not any(isinstance(f, bytes) or (isinstance(f, dict) and f["type"] == "audio")
                       for f in frames[end_at:])
        sent = audio_pairs(frames)
        assert ends[0]["sentences"] == len(sent) < 50
        # Quiet afterwards: the next frame is the pong, not audio still in the pipe.
        time.sleep(0.5)
        ws.send(json.dumps({"type": "ping"}))
        assert recv(ws) == {"type": "pong"}
        wait_for(lambda: espeak_children(server.proc.pid) == [], what="no espeak-ng left after the interrupt")
        # The socket goes on: the next turn has its audio.
        ws.send(json.dumps({"type": "message", "text": "Next one."}))
        frames = read_until(ws, lambda seen: bool(events(seen, "audio_end")))
        assert [e["sentence"] for e, _ in audio_pairs(frames)] == [0]
        assert events(frames, "audio_end")[0]["interrupted"] is False
    no_files_left(tmpdir_of_server)


MANY = " ".join(f"Sentence number {i} is here." for i in range(40))


@pytest.fixture(scope="module")
def instant_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The model is instant and espeak-ng takes tens of ms a sentence: the text (and ``done``)
    ends long before the audio."""
    with service(tmp_path_factory.mktemp("instant") / "sessions", "--tts") as proc:
        yield proc


@pytest.fixture
def iclient(instant_server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=instant_server.url, timeout=30) as c:
        yield c


def done_mid_audio(ws: ClientConnection, least: int = 2) -> list[Event | bytes]:
    """Send ``MANY``; frames up to ``done`` and at least ``least`` sentences' audio, the audio unfinished."""
    ws.send(json.dumps({"type": "message", "text": MANY}))
    frames = read_until(ws, lambda seen: bool(events(seen, "done")) and len(events(seen, "audio")) >= least
                        and isinstance(seen[-1], bytes))
    assert events(frames, "done")[0]["turn"] == 1
    if events(frames, "audio_end"):
        pytest.fail("all the audio was made before the text finished streaming; the test needs a longer text")
    return frames


def after_interrupt(ws: ClientConnection, frames: list[Event | bytes], msg: Event) -> Event:
    """Send interrupt ``msg``; the ``interrupted`` event, after an ``audio_end`` that stops the
    audio (nothing of it after that)."""
    ws.send(json.dumps(msg))
    frames += read_until(ws, lambda seen: bool(events(seen, "interrupted")))
    end = events(frames, "audio_end")
    assert len(end) == 1 and end[0]["interrupted"] is True and end[0]["sentences"] == len(audio_pairs(frames))
    end_at = frames.index(end[0])
    assert not any(isinstance(f, bytes) for f in frames[end_at:])
    stopped = events(frames, "interrupted")
    assert len(stopped) == 1 and stopped[0]["after_done"] is True
    return stopped[0]


def test_interrupt_after_done_keeps_the_sentences_sent(instant_server: ServiceProcess, iclient: httpx.Client) -> None:
    """No ``heard``, no ``heard_ms``: the reply is cut after the sentences whose audio went out."""
    with connect(ws_url(instant_server, sid := new_session(iclient)), open_timeout=10) as ws:
        recv(ws)
        frames = done_mid_audio(ws)
        full = events(frames, "done")[0]["response"]
        stopped = after_interrupt(ws, frames, {"type": "interrupt"})
        sent = events(frames, "audio_end")[0]["sentences"]
        sentences = [e["text"] for e in events(frames, "sentence")]
        assert 2 <= sent < len(sentences) == 40
        kept = " ".join(sentences[:sent])
        assert full.startswith(kept) and len(kept) < len(full)
        assert stopped == {"type": "interrupted", "after_done": True, "cut": True, "kept": True, "session_id": sid,
                           "response": kept, "turn": 1}
        ws.send(json.dumps({"type": "ping"}))
        assert recv(ws) == {"type": "pong"}
        got = iclient.get(f"/v1/sessions/{sid}").json()
        assert got["turns"] == 1 and got["history"][-1] == {"role": "assistant", "content": kept, "interrupted": True}
        wait_for(lambda: espeak_children(instant_server.proc.pid) == [], what="no espeak-ng left after the interrupt")
        # The socket goes on, and the next turn follows the cut one.
        ws.send(json.dumps({"type": "message", "text": "Next."}))
        frames = read_until(ws, lambda seen: bool(events(seen, "audio_end")))
        assert events(frames, "done")[0]["turn"] == 2
        assert events(frames, "audio_end")[0]["interrupted"] is False
    history = iclient.get(f"/v1/sessions/{sid}").json()["history"]
    assert history[1] == {"role": "assistant", "content": kept, "interrupted": True} and len(history) == 4


def test_interrupt_after_done_with_heard_ms_cuts_the_saved_reply(instant_server: ServiceProcess,
                                                                 iclient: httpx.Client) -> None:
    with connect(ws_url(instant_server, sid := new_session(iclient)), open_timeout=10) as ws:
        recv(ws)
        frames = done_mid_audio(ws, 3)
        pairs = audio_pairs(frames)
        # The first two sentences, and a moment of the third (its first word begun: heard).
        first_two = wav_seconds(pairs[0][1]) + wav_seconds(pairs[1][1])
        stopped = after_interrupt(ws, frames, {"type": "interrupt", "heard_ms": first_two * 1000 + 1})
    sentences = [e["text"] for e in events(frames, "sentence")]
    kept = " ".join(sentences[:2]) + " Sentence"
    assert sentences[0].endswith(": Sentence number 0 is here.") and sentences[2] == "Sentence number 2 is here."
    assert stopped["cut"] is True and stopped["kept"] is True and stopped["response"] == kept and stopped["turn"] == 1
    got = iclient.get(f"/v1/sessions/{sid}").json()
    assert got["turns"] == 1
    assert got["history"] == [{"role": "user", "content": MANY},
                              {"role": "assistant", "content": kept, "interrupted": True}]


def test_interrupt_after_done_with_nothing_heard_withdraws_the_turn(instant_server: ServiceProcess,
                                                                    iclient: httpx.Client) -> None:
    with connect(ws_url(instant_server, sid := new_session(iclient)), open_timeout=10) as ws:
        recv(ws)
        frames = done_mid_audio(ws)
        stopped = after_interrupt(ws, frames, {"type": "interrupt", "heard_ms": 0})
        assert stopped["cut"] is True and stopped["kept"] is False and stopped["response"] == ""
        assert stopped["turn"] == 0
        got = iclient.get(f"/v1/sessions/{sid}").json()
        assert got["turns"] == 0 and got["history"] == []
        # A heard that does not start the reply is ignored; heard_ms then decides, but never
        # beyond the sentences whose audio was sent.
        frames = done_mid_audio(ws)
        stopped = after_interrupt(ws, frames, {"type": "interrupt", "heard": "not the reply", "heard_ms": 10 ** 7})
        sent = events(frames, "audio_end")[0]["sentences"]
        kept = " ".join(e["text"] for e in events(frames, "sentence")[:sent])
        assert stopped["kept"] is True and stopped["response"] == kept and stopped["turn"] == 1
    assert iclient.get(f"/v1/sessions/{sid}").json()["history"][-1] == {"role": "assistant", "content": kept,
                                                                         "interrupted": True}


def test_interrupt_after_all_the_audio_changes_nothing(instant_server: ServiceProcess, iclient: httpx.Client) -> None:
    with connect(ws_url(instant_server, sid := new_session(iclient)), open_timeout=10) as ws:
        recv(ws)
        ws.send(json.dumps({"type": "message", "text": "One. Two. Three."}))
        frames = read_until(ws, lambda seen: bool(events(seen, "audio_end")) and bool(events(seen, "done")))
        assert events(frames, "audio_end") == [{"type": "audio_end", "sentences": 3, "interrupted": False}]
        full = events(frames, "done")[0]["response"]
        ws.send(json.dumps({"type": "interrupt", "heard_ms": 0}))
        ws.send(json.dumps({"type": "ping"}))
        assert recv(ws) == {"type": "pong"}  # no audio_end, no interrupted: nothing was stopped
    got = iclient.get(f"/v1/sessions/{sid}").json()
    assert got["turns"] == 1 and got["history"][-1] == {"role": "assistant", "content": full}


def test_disconnect_mid_audio_leaves_no_process_or_file(server: ServiceProcess, client: httpx.Client,
                                                       tmpdir_of_server: Path) -> None:
    for _ in range(3):
        sid = new_session(client)
        with connect(ws_url(server, sid), additional_headers=auth(TOKEN_A), open_timeout=10) as ws:
            recv(ws)
            ws.send(json.dumps({"type": "message", "text": LONG}))
            read_until(ws, lambda seen: bool(events(seen, "audio")))
        wait_for(lambda: espeak_children(server.proc.pid) == [], what="no espeak-ng left after the disconnect")
        no_files_left(tmpdir_of_server)
    assert server.health()["status"] == "ok"


def test_heard_ms_is_cut_by_the_audio_sent(server: ServiceProcess, client: httpx.Client) -> None:
    """A device that played our audio reports milliseconds: the kept text ends where the real
    durations of the sentences it got say."""
    sid = new_session(client)
    with connect(ws_url(server, sid), additional_headers=auth(TOKEN_A), open_timeout=10) as ws:
        recv(ws)
        ws.send(json.dumps({"type": "message", "text": LONG}))
        frames = read_until(ws, lambda seen: len(events(seen, "audio")) >= 3 and isinstance(seen[-1], bytes))
        pairs = audio_pairs(frames)
        # Exactly the first two sentences, plus a little of the third's audio (less than a word).
        first_two = wav_seconds(pairs[0][1]) + wav_seconds(pairs[1][1])
        ws.send(json.dumps({"type": "interrupt", "heard_ms": first_two * 1000 + 1}))
        frames += read_until(ws, lambda seen: bool(events(seen, "interrupted")))
    stopped = events(frames, "interrupted")[0]
    sentences = [e["text"] for e in events(frames, "sentence")]
    assert stopped["kept"] is True
    # Two sentences to their end, and the third's one word, begun (a begun word counts as heard).
    assert sentences[0].endswith(": word0.") and sentences[1:3] == ["word1.", "word2."]
    assert stopped["response"].rstrip() == " ".join(sentences[:3])
    history = client.get(f"/v1/sessions/{sid}").json()["history"]
    assert history[-1]["content"] == stopped["response"] and history[-1].get("interrupted")


def test_audio_asked_of_a_server_without_speech(tmp_path: Path) -> None:
    with service(tmp_path / "sessions") as proc, httpx.Client(base_url=proc.url, timeout=30) as c:
        sid = new_session(c)
        with connect(ws_url(proc, sid), open_timeout=10) as ws:
            assert recv(ws) == {"type": "ready", "session_id": sid}
            error = recv(ws)
            assert isinstance(error, dict) and error["code"] == "audio_unavailable" and "--tts" in error["message"]
            ws.send(json.dumps({"type": "message", "text": "text only"}))
            frames = read_until(ws, lambda seen: bool(events(seen, "done")))
            assert not any(isinstance(f, bytes) for f in frames)


def test_tts_without_espeak_refuses_to_start(tmp_path: Path) -> None:
    proc = ServiceProcess(tmp_path / "sessions", "--tts", env={"CONVERSATION_ESPEAK_BINARY": "/nonexistent/espeak-ng"},
                          wait=False)
    assert proc.proc.wait(30) == 2
    proc.stop()
    assert "espeak-ng" in proc.log() and "apt-get install espeak-ng" in proc.log()


def test_shutdown_mid_audio_leaves_no_process_or_file(tmp_path: Path) -> None:
    server_tmp = tmp_path / "tmp"
    server_tmp.mkdir()
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    server = ServiceProcess(tmp_path / "sessions", "--tts", env={"TMPDIR": str(server_tmp)})
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client, \
                connect(ws_url(server, new_session(client)), open_timeout=10) as ws:
            recv(ws)
            ws.send(json.dumps({"type": "message", "text": text}))
            read_until(ws, lambda seen: bool(events(seen, "audio")))
            seen: set[int] = set()
            end = time.monotonic() + 5
            while not seen and time.monotonic() < end:  # synthesis is running: catch its processes
                seen.update(espeak_children(server.proc.pid))
            assert seen, "no espeak-ng process seen while the audio was being made"
            assert server.stop() == 0
    finally:
        server.stop()
    assert not [pid for pid in seen if Path(f"/proc/{pid}").exists()]
    assert not list(server_tmp.glob("cs-service-audio-*"))
