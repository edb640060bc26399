"""Time to first audio: speaking sentence by sentence while the reply streams, vs the whole reply at once.

Run by hand (needs espeak-ng)::

    .venv/bin/python bench/bench_tts.py               # 5 repetitions, replies streamed at 25 pieces/s
    .venv/bin/python bench/bench_tts.py --reps 9 --rate 10
    .venv/bin/python bench/bench_tts.py --smoke      # 2 sentences each, once: proves it runs

Each reply is streamed the way a model writes it (English a word per piece, Chinese two
characters per piece) at ``--rate`` pieces per second, and also handed over complete at once
("instant").  "streaming" feeds the pieces to a ``Speaker`` as they arrive; "whole reply" waits
for the complete text and then synthesizes it in one espeak-ng call.  First audio is when the
first WAV file is written (this is a headless benchmark: no sound device needed).  Prints a
Markdown table of medians.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

from conversation_session.speech import EspeakEngine, Speaker, clean_for_speech, split_sentences

ENGLISH = (
    "Sure, here is a simple plan for your weekend trip. "
    "On Saturday morning, take the early train so you arrive before the crowds. "
    "Drop your bags at the hotel and walk down to the old harbour for breakfast. "
    "The fish market opens at eight, and it is worth seeing even if you buy nothing. "
    "After lunch, rent a bicycle and follow the coastal path to the lighthouse. "
    "The ride takes about an hour, with plenty of places to stop for photos. "
    "In the evening, book a table at one of the small restaurants near the square. "
    "On Sunday, visit the museum when it opens, since it gets busy by noon. "
    "Leave some time for the botanical garden on your way back to the station. "
    "Have a wonderful trip, and do not forget to pack a light jacket!"
)
CHINESE = (
    "好的，这是一个简单的周末出行计划。"
    "星期六早上，请坐早一点的火车，这样可以避开人群。"
    "到了以后先把行李放在酒店，然后走到老港口吃早饭。"
    "鱼市八点开门，就算什么都不买也值得去看看。"
    "午饭以后，租一辆自行车，沿着海边的小路骑到灯塔。"
    "骑车大约需要一个小时，路上有很多可以停下来拍照的地方。"
    "晚上可以在广场附近的小餐馆订一张桌子。"
    "星期天上午，博物馆一开门就去参观，因为中午人会很多。"
    "回车站的路上，留一点时间逛逛植物园。"
    "祝你旅途愉快，别忘了带一件薄外套！"
)


def pieces(text: str, lang: str) -> list[str]:
    if lang == "en":
        words = text.split(" ")
        return [w + " " for w in words[:-1]] + words[-1:]
    return [text[i: i + 2] for i in range(0, len(text), 2)]


def wav_seconds(paths: list[Path]) -> float:
    total = 0.0
    for path in paths:
        with wave.open(str(path)) as w:
            total += w.getnframes() / w.getframerate()
    return total


def run_streaming(engine: EspeakEngine, out: Path, parts: list[str], interval: float, rep: int) -> tuple[float, float]:
    with Speaker(engine, output_dir=out, playback=False) as speaker:
        t0 = time.perf_counter()
        speaker.start_turn(t0, f"stream_{rep:02d}")
        for part in parts:
            if interval:
                time.sleep(interval)  # the model producing the next piece
            speaker.feed(part)
        report = speaker.finish(60)
    assert report.first_audio_s is not None and report.errors == 0, report
    return report.first_audio_s, report.total_s


def run_whole(engine: EspeakEngine, out: Path, parts: list[str], interval: float, rep: int,
              lang: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    text = ""
    for part in parts:
        if interval:
            time.sleep(interval)
        text += part
    path = out / f"whole_{rep:02d}.wav"
    job = engine.speak(clean_for_speech(text), lang, path)
    if job.wait() != 0:
        raise RuntimeError(f"espeak-ng failed: {job.error}")
    elapsed = time.perf_counter() - t0
    return elapsed, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per case (median reported)")
    parser.add_argument("--rate", type=float, default=25.0, help="streamed pieces per second (a model's speed)")
    parser.add_argument("--smoke", action="store_true", help="the first 2 sentences of each reply, once, at 100 "
                        "pieces/s: proves the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.reps, args.rate = 1, 100.0
    if not EspeakEngine.available():
        print("espeak-ng is not installed: sudo apt-get install espeak-ng", file=sys.stderr)
        return 1
    engine = EspeakEngine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_tts_") as tmp:
        for name, text, lang in (("English", ENGLISH, "en"), ("Chinese", CHINESE, "cmn")):
            if args.smoke:
                text = "".join(re.findall(r".+?[.!?。！？]\s*", text)[:2])
            parts = pieces(text, lang)
            for label, interval in ((f"{args.rate:g} pieces/s", 1 / args.rate), ("instant", 0.0)):
                for mode in ("streaming", "whole reply"):
                    firsts, totals = [], []
                    for rep in range(args.reps):
                        out = Path(tmp) / f"{lang}_{label.split()[0]}_{mode.split()[0]}_{rep}"
                        out.mkdir()
                        if mode == "streaming":
                            first, total = run_streaming(engine, out, parts, interval, rep)
                        else:
                            first, total = run_whole(engine, out, parts, interval, rep, lang)
                        firsts.append(first)
                        totals.append(total)
                    audio = wav_seconds(sorted(out.glob("*.wav")))
                    rows.append((name, len(split_sentences(text)), len(parts), label, mode,
                                 statistics.median(firsts), statistics.median(totals), audio,
                                 len(parts) * interval))
    print(f"espeak-ng {engine.binary}, {args.reps} repetitions, medians; first audio = first WAV written\n")
    print("| reply | sentences | pieces | text arrives | mode | first audio | all audio ready | audio length |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |")
    for name, sentences, n, label, mode, first, total, audio, stream_s in rows:
        arrives = f"{label} ({stream_s:.1f} s)" if stream_s else label
        print(f"| {name} | {sentences} | {n} | {arrives} | {mode} | {first * 1000:.0f} ms | "
              f"{total * 1000:.0f} ms | {audio:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
