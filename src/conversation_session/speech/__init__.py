"""Speech for replies as they stream: sentence by sentence, in the language of the text.

    from conversation_session.speech import create_speaker

    speaker = create_speaker("espeak", output_dir="speech")   # None if espeak-ng is missing
    speaker.start_turn(time.perf_counter(), "session_1_turn1")
    for piece in stream:
        speaker.feed(piece)                                   # returns at once
    report = speaker.finish(timeout=30)                       # SpeechTimeout: stopped after 30 s
    print(report.first_audio_s, report.wav_files)

Barge-in: ``heard = speaker.interrupt()`` stops the speech within milliseconds and returns what
reached the user (``heard.text``, a prefix of the reply as streamed), by the playback clock.
``playback="silent"`` plays in real time without a sound device (headless machines, tests).
A remote device that plays the audio itself reports its position: ``heard_prefix(reply, heard_ms,
speaker.durations())``.

Engines plug in by subclassing ``SpeechEngine`` (espeak-ng ships); ``tts=None`` is silent.
"""

from ._engine import ProcessJob, SpeechEngine, SpeechJob, sound_device_available, wav_bytes_seconds
from ._espeak import ESPEAK_BINARY_ENV, ESPEAK_INSTALL_HINT, EspeakEngine, find_espeak
from ._heard import (
    HAN_WEIGHT,
    SECONDS_PER_LETTER,
    HeardReport,
    SentenceClock,
    cut_sentence,
    heard_prefix,
    speech_weight,
)
from ._speaker import PLAYBACK_CHOICES, TTS_CHOICES, Playback, Speaker, SpeechReport, SpeechTimeout, create_speaker
from ._split import Sentence, SentenceSplitter, clean_for_speech, script_runs, split_sentence_spans, split_sentences

__all__ = [
    "ESPEAK_BINARY_ENV",
    "ESPEAK_INSTALL_HINT",
    "HAN_WEIGHT",
    "PLAYBACK_CHOICES",
    "SECONDS_PER_LETTER",
    "TTS_CHOICES",
    "EspeakEngine",
    "HeardReport",
    "Playback",
    "ProcessJob",
    "Sentence",
    "SentenceClock",
    "SentenceSplitter",
    "Speaker",
    "SpeechEngine",
    "SpeechJob",
    "SpeechReport",
    "SpeechTimeout",
    "clean_for_speech",
    "create_speaker",
    "cut_sentence",
    "find_espeak",
    "heard_prefix",
    "script_runs",
    "sound_device_available",
    "speech_weight",
    "split_sentence_spans",
    "split_sentences",
    "wav_bytes_seconds",
]
