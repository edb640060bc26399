"""Speech for replies as they stream: sentence by sentence, in the language of the text.

    from conversation_session.speech import create_speaker

    speaker = create_speaker("espeak", output_dir="speech")   # None if espeak-ng is missing
    speaker.start_turn(time.perf_counter(), "session_1_turn1")
    for piece in stream:
        speaker.feed(piece)                                   # returns at once
    report = speaker.finish(timeout=30)                       # SpeechTimeout: stopped after 30 s
    print(report.first_audio_s, report.wav_files)

Engines plug in by subclassing ``SpeechEngine`` (espeak-ng ships); ``tts=None`` is silent.
"""

from ._engine import ProcessJob, SpeechEngine, SpeechJob, sound_device_available
from ._espeak import ESPEAK_BINARY_ENV, ESPEAK_INSTALL_HINT, EspeakEngine, find_espeak
from ._speaker import TTS_CHOICES, Speaker, SpeechReport, SpeechTimeout, create_speaker
from ._split import SentenceSplitter, clean_for_speech, script_runs, split_sentences

__all__ = [
    "ESPEAK_BINARY_ENV",
    "ESPEAK_INSTALL_HINT",
    "TTS_CHOICES",
    "EspeakEngine",
    "ProcessJob",
    "SentenceSplitter",
    "Speaker",
    "SpeechEngine",
    "SpeechJob",
    "SpeechReport",
    "SpeechTimeout",
    "clean_for_speech",
    "create_speaker",
    "find_espeak",
    "script_runs",
    "sound_device_available",
    "split_sentences",
]
