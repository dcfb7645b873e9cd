"""Separate virtual environments for real peer libraries, made once and cached in .venv-peers/.

A peer library (constellationdaq, cs.packetstream, saturnin) pins dependencies that must not leak into daqd's own
environment, so each gets its own venv, created on first use by the test session that needs it and
reused afterwards. Tests drive the peer as a subprocess running `peer_python(name)`.

Every package of a peer venv is pinned (the peer and each of its dependencies) in
tests/peer-requirements/, and installed with --no-deps so that nothing unpinned can slip in. The venv
remembers a digest of the pins and the python it was built with; when either changes, the venv is
rebuilt on its next use.
"""

from __future__ import annotations

import fcntl
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / ".venv-peers"
# The pins of ../shared/peers/ (the team's pinned peer installs), copied here so that a clone
# anywhere installs the same versions.
PINS = Path(__file__).resolve().parent / "peer-requirements"

# name -> the pin files installed (each with --no-deps, in order) into the venv
RECIPES: dict[str, list[str]] = {
    "constellation": ["constellation.txt"],
    "packetstream": ["cs-packetstream.txt", "cs-packetstream-other.txt"],
    "saturnin": ["saturnin.txt"],
}


def recipe_digest(name: str) -> str:
    """A digest of everything that decides what the venv `name` holds: its pin files' contents and
    the version of the python that builds it."""
    h = hashlib.sha256(sys.version.encode())
    for filename in RECIPES[name]:
        h.update(filename.encode() + b"\0" + (PINS / filename).read_bytes() + b"\0")
    return h.hexdigest()


def peer_python(name: str) -> Path:
    """Return the python of the peer venv `name`, (re)creating it under a file lock if it is missing
    or was built from other pins."""
    venv = PEERS_DIR / name
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    digest = recipe_digest(name)
    PEERS_DIR.mkdir(exist_ok=True)
    with open(PEERS_DIR / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text().strip() == digest:
            return python
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        for filename in RECIPES[name]:
            subprocess.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "--no-deps",
                    "-r",
                    str(PINS / filename),
                ],
                check=True,
            )
        stamp.write_text(digest + "\n")
    return python
