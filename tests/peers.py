"""Separate virtual environments for real peer libraries, made once and cached in .venv-peers/.

A peer library (constellationdaq, cs.packetstream) pins dependencies that must not leak into daqd's own
environment, so each gets its own venv, created on first use by the test session that needs it and
reused afterwards. Tests drive the peer as a subprocess running `peer_python(name)`.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / ".venv-peers"
# The pins of ../shared/peers/ (the team's pinned peer installs), copied here so that a clone
# anywhere installs the same versions.
PINS = Path(__file__).resolve().parent / "peer-requirements"

# name -> list of pip argument lists, run in order inside the new venv
RECIPES: dict[str, list[list[str]]] = {
    "constellation": [["constellationdaq==1.0.2"]],
    "packetstream": [
        ["--no-deps", "-r", str(PINS / "cs-packetstream.txt")],
        ["-r", str(PINS / "cs-packetstream-other.txt")],
    ],
}


def peer_python(name: str) -> Path:
    """Return the python of the peer venv `name`, creating it (under a file lock) if missing."""
    venv = PEERS_DIR / name
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    PEERS_DIR.mkdir(exist_ok=True)
    with open(PEERS_DIR / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        for args in RECIPES[name]:
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                check=True,
            )
        stamp.touch()
    return python
