"""Every shipped example configuration passes `daqd check` as a user would run it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import DAQD

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").rglob("*.toml"))


def test_there_are_examples_for_each_seed_system() -> None:
    types = " ".join(p.read_text() for p in EXAMPLES)
    for t in ("slowsignal", "cdtp", "dcss", "http_poll", "packetstream"):
        assert f'type = "{t}"' in types


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(path: Path) -> None:
    out = subprocess.run([DAQD, "check", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{path}: OK")
