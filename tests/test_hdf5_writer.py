"""daqd.hdf5.RunFileWriter while another process follows the file in SWMR mode: a table that
appears mid-run (the file is opened once more outside SWMR mode for it) and the end attributes
are written although the reader holds the file open, and the reader goes on reading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.hdf5 import Batch, Layout, Options, RunFileWriter
from daqd.record import Record

READER = r"""
import sys, h5py
f = h5py.File(sys.argv[1], "r", swmr=True)
t = f["SlowSignal/readout"]
print(t.shape[0], flush=True)
for line in sys.stdin:
    t.refresh()
    print(t.shape[0], flush=True)
"""


def readout(k: int) -> Record:
    tags = {"tack": k, "readout": k + 1, "cpu_time_ns": 5, "dtype": "<u2", "modules_present": 1}
    return Record("ss", k + 1, 0, tags, [np.full((32, 64), k, "<u2").tobytes()])


def test_a_table_added_mid_run_and_the_end_attributes_with_a_swmr_reader_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run-w.h5"
    layout = Layout("json")
    w = RunFileWriter(
        path, Options(), {"run_id": "w"}, swmr=True, readout_paths=[("/SlowSignal/readout", "ss")]
    )
    batch = Batch()
    layout.add(batch, [readout(k) for k in range(5)])
    w.write(batch)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdin is not None and reader.stdout is not None
    try:
        assert reader.stdout.readline().strip() == "5"
        batch = Batch()
        layout.add(batch, [readout(5), Record("raw", 1, 9, {"a": 1}, [b"new table"])])
        w.write(batch)  # /records/raw did not exist: made outside SWMR mode, then SWMR again
        batch = Batch()
        layout.add(batch, [readout(k) for k in range(6, 9)])
        w.write(batch)
        reader.stdin.write("\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "9"  # it still follows the readouts
        w.close({"condition": "GOOD"})
    finally:
        reader.stdin.close()
        reader.wait(30)
    assert reader.returncode == 0
    with h5py.File(path, "r") as f:
        assert list(f["SlowSignal/readout"]["iro"]) == list(range(1, 10))
        assert bytes(f["records/raw"][0]["payload"]) == b"new table"
        assert f.attrs["condition"] == "GOOD" and f.attrs["run_id"] == "w"
        assert f["SlowSignal/readout"].attrs["NROWS"] == 9


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
)
_tags = st.dictionaries(
    st.sampled_from(["tack", "readout", "cpu_time_ns", "dtype", "format", "modules_present", "x"]),
    st.one_of(_values, st.sampled_from(["<u2", "<f4", "ssdaq"])),
)


@settings(max_examples=60, deadline=None)
@given(
    records=st.lists(
        st.tuples(
            _tags,
            st.lists(
                st.one_of(st.binary(max_size=64), st.sampled_from([bytes(4096), bytes(8192)])),
                max_size=2,
            ),
        ),
        max_size=6,
    )
)
def test_any_tags_and_payload_are_written_as_a_readout_or_a_generic_row(
    tmp_path_factory: pytest.TempPathFactory, records: list[tuple[dict[str, Any], list[bytes]]]
) -> None:
    path = tmp_path_factory.mktemp("h") / "any.h5"
    w = RunFileWriter(path, Options(), {}, swmr=False)
    batch = Batch()
    recs = [Record("s", i + 1, 1, tags, blocks) for i, (tags, blocks) in enumerate(records)]
    Layout("json").add(batch, recs)
    w.write(batch)
    w.close({})
    with h5py.File(path, "r") as f:
        rows = sum(len(f[p]) for p in ("SlowSignal/readout", "records/s") if p in f)
        assert rows == len(recs)
        if "records/s" in f:
            for row in f["records/s"][:]:
                rec = recs[row["seq"] - 1]
                assert bytes(row["payload"]) == b"".join(rec.payload)
