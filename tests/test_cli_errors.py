"""The terminal app's one-line errors for a damaged session file and a full disk.

About the app, not the model: both run on the fake backend (``--backend fake``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_resuming_a_corrupt_session_file_prints_one_line(sessions_dir):
    sessions_dir.mkdir()
    (sessions_dir / "session_1.json").write_text("{ not json")
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--backend", "fake", "--resume", "session_1"],
                          input="", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("❌") == 1 and "session_1.json: not valid JSON" in proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


def test_a_full_disk_warns_and_keeps_the_turn(sessions_dir):
    """RLIMIT_FSIZE makes every write fail like a full disk; the reply still shows, with a warning."""
    code = f"""
import resource, sys
sys.argv = ["main.py", "--backend", "fake"]
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.path.insert(0, {str(ROOT)!r})
from conversation_session.cli import main
sys.exit(main())
"""
    proc = subprocess.run([sys.executable, "-c", code], input="hello\nhistory\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Reply 1: hello\n")
    assert "could not be saved to disk" in proc.stderr and "kept in memory" in proc.stderr
    assert "1 turn(s), 2 message(s)" in proc.stdout
    assert "Traceback" not in proc.stderr
