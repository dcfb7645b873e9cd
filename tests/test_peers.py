"""The peer venvs are fully pinned and rebuilt when their pins change."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import peers


def test_every_peer_package_is_pinned() -> None:
    for name, files in peers.RECIPES.items():
        for filename in files:
            lines = [
                line.strip()
                for line in (peers.PINS / filename).read_text().splitlines()
                if line.strip() and not line.startswith("#")
            ]
            assert lines, f"{name}: {filename} is empty"
            for line in lines:
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-+]+", line), (name, line)


def test_a_changed_pin_changes_the_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pins = tmp_path / "pins"
    pins.mkdir()
    (pins / "a.txt").write_text("foo==1.0\n")
    monkeypatch.setattr(peers, "PINS", pins)
    monkeypatch.setattr(peers, "RECIPES", {"x": ["a.txt"]})
    before = peers.recipe_digest("x")
    assert peers.recipe_digest("x") == before
    (pins / "a.txt").write_text("foo==1.1\n")
    assert peers.recipe_digest("x") != before


def test_a_venv_built_from_other_pins_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stamp from other pins makes peer_python rebuild the venv (venv --clear, then each pin file
    with --no-deps); a current stamp is reused without running anything. (The commands are recorded
    instead of run: a real venv build costs ~15 s; the interop tests use the real one.)"""
    pins = tmp_path / "pins"
    pins.mkdir()
    (pins / "a.txt").write_text("foo==1.0\n")
    (pins / "b.txt").write_text("bar==2.0\n")
    monkeypatch.setattr(peers, "PINS", pins)
    monkeypatch.setattr(peers, "PEERS_DIR", tmp_path / "venvs")
    monkeypatch.setattr(peers, "RECIPES", {"x": ["a.txt", "b.txt"]})
    ran: list[list[str]] = []
    monkeypatch.setattr(peers.subprocess, "run", lambda args, check: ran.append(list(args)))
    venv = tmp_path / "venvs" / "x"
    venv.mkdir(parents=True)
    (venv / ".installed").write_text("a digest of older pins\n")

    peers.peer_python("x")
    assert ran[0][1:] == ["-m", "venv", "--clear", str(venv)]
    assert [r[-3:] for r in ran[1:]] == [
        ["--no-deps", "-r", str(pins / "a.txt")],
        ["--no-deps", "-r", str(pins / "b.txt")],
    ]
    assert (venv / ".installed").read_text().strip() == peers.recipe_digest("x")

    ran.clear()
    peers.peer_python("x")
    assert ran == []  # current stamp: reused
    (pins / "b.txt").write_text("bar==2.1\n")
    peers.peer_python("x")
    assert ran and ran[0][1:3] == ["-m", "venv"]  # a pin changed: rebuilt
