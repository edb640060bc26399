"""Barge-in: time from ``Speaker.interrupt()`` to silence, with the real espeak-ng.

Run by hand (needs espeak-ng)::

    .venv/bin/python bench/bench_interrupt.py            # 50 interrupts per setting
    .venv/bin/python bench/bench_interrupt.py --reps 200 --json bench/results/interrupt.json
    .venv/bin/python bench/bench_interrupt.py --smoke    # 2 interrupts per setting: proves it runs

For each setting a long English reply is streamed into a ``Speaker`` and interrupted after a
random delay (seeded: one in three within 0-50 ms, the others 50 ms-1.2 s), so the interrupt
lands sometimes while espeak-ng is still synthesizing the first sentence (a process to kill, nothing
heard yet) and mostly while a sentence is playing.  Figures:

- ``silence``: ``HeardReport.interrupt_to_silence_s``, from the call until no audio is playing
  (the process killed and reaped, or the silent sink's worker woken and stopped), measured inside
  ``interrupt()``;
- ``returns``: the whole ``interrupt()`` call, which also works out the heard text (on the sound
  device that can mean synthesizing the cut-off sentence again to learn its length: after silence).

Settings: ``silent sink`` (``playback="silent"``, the headless default for barge-in),
``silent sink + WAV`` (also writing the WAV files), ``sound device`` (``playback="device"``; only
when a device is found), and ``device stand-in``: a plug-in engine whose "playback" is a ``sleep``
process, which measures the kill-and-reap path the sound device takes, on a headless machine.
After every interrupt no speech process may be left (checked).  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from conversation_session.speech import (
    SECONDS_PER_LETTER,
    EspeakEngine,
    ProcessJob,
    Speaker,
    SpeechEngine,
    sound_device_available,
    speech_weight,
)

REPLY = " ".join(
    f"Here is point number {n} of the plan, with a few more words to make the sentence longer."
    for n in range(1, 40)
)


class SleepDevice(EspeakEngine):
    """"Playback" is a ``sleep`` process about as long as espeak-ng's audio (at its default rate);
    ``measure`` (asked for the sentence cut off) is espeak-ng's own, as on a real device."""

    name = "sleep-device"
    can_play = True

    def speak(self, text: str, lang: str, wav_path: Path | None) -> ProcessJob:
        if wav_path is not None:
            return super().speak(text, lang, wav_path)
        return ProcessJob(["sleep", f"{speech_weight(text) * SECONDS_PER_LETTER:.3f}"])


def our_children() -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1: stat.rindex(")")]
            if int(stat[stat.rindex(")") + 2:].split()[1]) == os.getpid() and comm in ("espeak-ng", "sleep"):
                found.append(comm)
    return found


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(engine: SpeechEngine, playback: str, reps: int, seed: int, output_dir: str | None) -> dict[str, object]:
    rng = random.Random(seed)
    silence: list[float] = []
    returns: list[float] = []
    playing = 0
    heard_chars: list[int] = []
    with Speaker(engine, playback=playback, output_dir=output_dir) as spk:
        for k in range(reps):
            spk.start_turn(time.perf_counter(), f"rep{k}")
            spk.feed(REPLY)
            # One in three early, while espeak-ng is still synthesizing the first sentence.
            time.sleep(rng.uniform(0.0, 0.05) if rng.random() < 1 / 3 else rng.uniform(0.05, 1.2))
            clock = spk.clock()
            playing += any(e.started is not None and e.ended is None for e in clock)
            t = time.perf_counter()
            heard = spk.interrupt()
            returns.append(time.perf_counter() - t)
            assert heard.interrupt_to_silence_s is not None
            silence.append(heard.interrupt_to_silence_s)
            heard_chars.append(len(heard.text))
            assert REPLY.startswith(heard.text)
            left = our_children()
            assert not left, f"speech processes left after interrupt(): {left}"
    return {
        "reps": reps, "interrupted_while_playing": playing,
        "silence_p50_ms": 1000 * statistics.median(silence), "silence_p99_ms": 1000 * quantile(silence, 0.99),
        "silence_max_ms": 1000 * max(silence),
        "returns_p50_ms": 1000 * statistics.median(returns), "returns_p99_ms": 1000 * quantile(returns, 0.99),
        "heard_chars_median": statistics.median(heard_chars),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--smoke", action="store_true", help="2 interrupts per setting: proves the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.reps = 2
    if not EspeakEngine.available():
        print("espeak-ng is not installed (sudo apt-get install espeak-ng)", file=sys.stderr)
        return 1
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings: list[tuple[str, SpeechEngine, str, str | None]] = [
            ("silent sink", EspeakEngine(), "silent", None),
            ("silent sink + WAV", EspeakEngine(), "silent", tmp),
            ("device stand-in (sleep process)", SleepDevice(), "device", None),
        ]
        if sound_device_available():
            settings.append(("sound device", EspeakEngine(), "device", None))
        for name, engine, playback, out in settings:
            results[name] = run(engine, playback, args.reps, args.seed, out)
            print(f"{name}: done", file=sys.stderr)
    if not sound_device_available():
        print("(no sound device here: the sound-device row is left out)", file=sys.stderr)
    print(f"Interrupt to silence, {args.reps} interrupts per setting, espeak-ng, {os.cpu_count()} cores\n")
    print("| setting | interrupted while playing | silence p50 | silence p99 | silence max | "
          "interrupt() returns p50 | p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['interrupted_while_playing']}/{r['reps']} | {r['silence_p50_ms']:.2f} ms | "
              f"{r['silence_p99_ms']:.2f} ms | {r['silence_max_ms']:.2f} ms | {r['returns_p50_ms']:.2f} ms | "
              f"{r['returns_p99_ms']:.2f} ms |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
