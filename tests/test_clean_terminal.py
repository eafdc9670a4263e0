"""A clean terminal: `studio generate`, `studio imagine` and the app print no library warnings
(deprecations, dtype casts, advice), on the shipped default models, as a user runs them."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDIO = [sys.executable, "-m", "studio.cli"]
# what libraries print when they warn: Python's warnings, and transformers' / diffusers' loggers
WARNING = re.compile(r"Warning|warn\(|deprecated|\[transformers\]|\[diffusers\]|Casting directly|should be kept in float32",
                     re.IGNORECASE)


def run(command: list[str]) -> subprocess.CompletedProcess:
    """`command` in a process of its own, with Python's own warning filters (pytest's do not apply)."""
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if WARNING.search(line)]


def test_studio_generate_prints_no_library_warnings():
    done = run([*STUDIO, "generate", "The cat sat", "--max-new-tokens", "4", "--show-probs", "2"])
    assert done.returncode == 0, done.stderr
    assert warnings_in(done.stdout + done.stderr) == []


def test_studio_imagine_prints_no_library_warnings(tmp_path):
    done = run([*STUDIO, "imagine", "", "-o", str(tmp_path / "image.png"), "--steps", "2"])
    assert done.returncode == 0, done.stderr
    assert warnings_in(done.stdout + done.stderr) == []
    assert (tmp_path / "image.png").is_file()


@pytest.mark.slow
def test_the_app_starts_without_library_warnings():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port)}
    app = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert app.poll() is None and time.monotonic() < deadline, "the app did not start"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                time.sleep(1)
    finally:
        app.terminate()
        output, _ = app.communicate(timeout=30)
    assert warnings_in(output) == []
