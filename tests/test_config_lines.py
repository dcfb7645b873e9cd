"""Configuration errors carry line numbers: the TOML key scanner and parse_config's use of it."""

from __future__ import annotations

import pytest

from daqd.config import parse_config
from daqd.errors import ConfigError
from daqd.tomllines import key_lines, line_of

TEXT = """# header comment
[daemon]
name = "x"   # a comment with = and [brackets]

[[receiver]]
type = "dcss"
name = "dhs"
connect = "127.0.0.1:1"
dhs_name = "dhs"
handler_settings = { a = 1, when = 1979-05-27T07:32:00Z }
protocol_levl = 2
notes = \"\"\"
fake = 1
[not.a.table]
\"\"\"

[receiver.motors.m]
speed_units_per_s = "fast"

[[receiver]]
"type" = "tcp"
name = "t"
framing = [
  "x",
  "y = 3",
]
listen = '127.0.0.1:0'
"""


def test_key_lines_follow_tables_arrays_and_skip_multiline_values() -> None:
    lines = key_lines(TEXT)
    assert lines[("daemon",)] == 2 and lines[("daemon", "name")] == 3
    assert lines[("receiver", 1)] == 5
    assert lines[("receiver", 1, "protocol_levl")] == 11
    assert lines[("receiver", 1, "notes")] == 12
    assert ("receiver", 1, "fake") not in lines and ("not", "a", "table") not in lines
    assert lines[("receiver", 1, "motors", "m")] == 17
    assert lines[("receiver", 1, "motors", "m", "speed_units_per_s")] == 18
    assert lines[("receiver", 2)] == 20 and lines[("receiver", 2, "type")] == 21
    assert ("receiver", 2, "y") not in lines
    assert lines[("receiver", 2, "listen")] == 27
    # a key inside an inline table: the line of the key holding it
    assert line_of(lines, ("receiver", 1, "handler_settings", "when")) == 10
    assert line_of(lines, ("publisher", 1)) is None


def test_parse_config_reports_each_error_at_its_line() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(TEXT, "site.toml")
    got = str(exc.value).splitlines()
    assert got[0] == "site.toml: 5 errors"
    assert got[1:] == [
        'site.toml: [[receiver]] #1 (name "dhs"): key "handler_settings.when": input was not a '
        "valid JSON value (got 1979-05-27T07:32:00+00:00) (line 10)",
        'site.toml: [[receiver]] #1 (name "dhs"): key "protocol_levl": unknown key; did you mean '
        '"protocol_level"? (line 11)',
        'site.toml: [[receiver]] #1 (name "dhs"): key "notes": unknown key (line 12)',
        'site.toml: [[receiver]] #1 (name "dhs"): key "motors.m.speed_units_per_s": must be a '
        "number (got 'fast') (line 18)",
        'site.toml: [[receiver]] #2 (name "t"): key "framing": must be one of \'length32\', '
        "'line' or 'raw' (got ['x', 'y = 3']) (line 23)",
    ]
