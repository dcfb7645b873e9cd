"""SSDAQ's chec.LogData and chec.MonitorData in daqd.protocols.ssdaq_pb, against Google's protobuf
runtime: reference classes built at run time from a descriptor written here with the field numbers
of SSDAQ's log.proto and monitor.proto (proto2), so both sides are independent implementations."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.protocols import ssdaq_pb as pb

protobuf = pytest.importorskip("google.protobuf")
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # noqa: E402

F = descriptor_pb2.FieldDescriptorProto


def _reference_classes() -> tuple[Any, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="daqd_test_chec.proto", package="chec", syntax="proto2"
    )

    def add(msg: Any, name: str, number: int, ftype: int, label: int, **kw: Any) -> None:
        msg.field.add(name=name, number=number, type=ftype, label=label, **kw)

    req, opt, rep = F.LABEL_REQUIRED, F.LABEL_OPTIONAL, F.LABEL_REPEATED
    log = fdp.message_type.add(name="LogData")
    sev = log.enum_type.add(name="Severity")
    for name, n in (("NOTSET", 0), ("DEBUG", 10), ("INFO", 20), ("WARNING", 30)):
        sev.value.add(name=name, number=n)
    for name, n in (("ERROR", 40), ("FATAL", 50)):
        sev.value.add(name=name, number=n)
    add(log, "systemType", 1, F.TYPE_INT32, req)
    add(log, "severity", 2, F.TYPE_ENUM, req, type_name=".chec.LogData.Severity")
    add(log, "sender", 3, F.TYPE_STRING, req)
    add(log, "message", 4, F.TYPE_STRING, req)
    add(log, "time", 5, F.TYPE_INT64, req)
    add(log, "pid", 6, F.TYPE_INT32, req)
    add(log, "sourceFile", 7, F.TYPE_STRING, req)
    add(log, "line", 8, F.TYPE_INT32, req)
    add(log, "position", 9, F.TYPE_STRING, opt)
    add(log, "geoid", 10, F.TYPE_STRING, opt)
    add(log, "seqid", 11, F.TYPE_INT32, opt)
    add(log, "cameraPcTime", 12, F.TYPE_INT64, opt)
    t = fdp.message_type.add(name="TimeUTC")
    add(t, "sec", 1, F.TYPE_INT32, req)
    add(t, "nsec", 2, F.TYPE_INT32, req)
    mon = fdp.message_type.add(name="MonitorData")
    r = mon.nested_type.add(name="Reciever")
    add(r, "name", 1, F.TYPE_STRING, req)
    add(r, "pid", 2, F.TYPE_INT32, opt)
    add(r, "recv_data", 3, F.TYPE_BOOL, opt)
    add(r, "data_rate", 4, F.TYPE_FLOAT, opt)
    add(r, "from_tm", 5, F.TYPE_UINT32, rep, options=descriptor_pb2.FieldOptions(packed=True))
    add(mon, "time", 1, F.TYPE_MESSAGE, req, type_name=".chec.TimeUTC")
    add(mon, "reciver", 16, F.TYPE_MESSAGE, opt, type_name=".chec.MonitorData.Reciever")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("chec.LogData")),
        get(pool.FindMessageTypeByName("chec.MonitorData")),
    )


RefLogData, RefMonitorData = _reference_classes()

i32 = st.integers(-(1 << 31), (1 << 31) - 1)
i64 = st.integers(-(1 << 63), (1 << 63) - 1)
text = st.text(max_size=40)
logs = st.builds(
    pb.LogData,
    system_type=i32, severity=st.sampled_from([0, 10, 20, 30, 40, 50]), sender=text,
    message=st.text(max_size=300), time=i64, pid=i32, source_file=text, line=i32,
    position=st.none() | text, geoid=st.none() | text, seqid=st.none() | i32,
    camera_pc_time=st.none() | i64,
)  # fmt: skip
f32 = st.floats(width=32, allow_nan=False)
rates = st.builds(
    pb.ReceiverRate,
    name=text, pid=st.none() | i32, recv_data=st.none() | st.booleans(), data_rate=st.none() | f32,
    from_tm=st.lists(st.integers(0, 0xFFFFFFFF), max_size=5),
)  # fmt: skip
monitors = st.builds(pb.MonitorData, sec=i32, nsec=i32, receiver=st.none() | rates)

_LOG_NAMES = {"system_type": "systemType", "source_file": "sourceFile"}
_LOG_NAMES["camera_pc_time"] = "cameraPcTime"


def _log_from_ref(ref: Any) -> pb.LogData:
    got = pb.LogData()
    for name, _ in pb._LOG_FIELDS.values():
        ref_name = _LOG_NAMES.get(name, name)
        if ref.HasField(ref_name):
            setattr(got, name, getattr(ref, ref_name))
    return got


def _monitor_from_ref(ref: Any) -> pb.MonitorData:
    got = pb.MonitorData(sec=ref.time.sec, nsec=ref.time.nsec)
    if ref.HasField("reciver"):
        r = ref.reciver

        def opt(k: str) -> Any:
            return getattr(r, k) if r.HasField(k) else None

        got.receiver = pb.ReceiverRate(
            name=r.name,
            pid=opt("pid"),
            recv_data=opt("recv_data"),
            data_rate=opt("data_rate"),
            from_tm=list(r.from_tm),
        )
    return got


@settings(max_examples=200)
@given(logs)
def test_log_data_round_trips_through_googles_runtime(log: pb.LogData) -> None:
    data = pb.encode_log_data(log)
    ref = RefLogData.FromString(data)  # raises if a required field were missing
    assert _log_from_ref(ref) == log
    assert ref.SerializeToString() == data  # field order and encodings as protobuf writes them
    assert pb.decode_log_data(data) == log
    tags = pb.decode_log_data(data).tags()
    assert tags["severity"] == RefLogData.Severity.Name(log.severity)
    assert (tags["sender"], tags["time"], tags["level"]) == (log.sender, log.time, log.severity)


@settings(max_examples=200)
@given(monitors)
def test_monitor_data_round_trips_through_googles_runtime(mon: pb.MonitorData) -> None:
    data = pb.encode_monitor_data(mon)
    ref = RefMonitorData.FromString(data)
    assert _monitor_from_ref(ref) == mon
    assert ref.SerializeToString() == data
    assert pb.decode_monitor_data(ref.SerializeToString()) == mon


def test_what_ssdaqs_sender_writes_decodes_to_tags() -> None:
    """The message SSDAQ's ReceiverMonSender and ChecSocketLogHandler build, by Google's runtime."""
    ref = RefMonitorData()
    ref.time.sec, ref.time.nsec = 1_700_000_000, 250_000_000
    ref.reciver.name, ref.reciver.pid = "ReadoutAssembler", 4242
    ref.reciver.recv_data, ref.reciver.data_rate = True, 159.9
    got = pb.decode_monitor_data(ref.SerializeToString())
    tags = got.tags()
    assert tags["receiver"] == "ReadoutAssembler" and tags["pid"] == 4242
    assert tags["recv_data"] is True and math.isclose(tags["data_rate"], 159.9, rel_tol=1e-6)
    assert tags["time"] == {"sec": 1_700_000_000, "nsec": 250_000_000}
    log = RefLogData(
        systemType=0, severity=30, sender="ssdaq.x", message="disk almost full", time=-5,
        pid=7, sourceFile="/a/b.py", line=-1,
    )  # fmt: skip
    got_log = pb.decode_log_data(log.SerializeToString())
    assert (got_log.severity, got_log.time, got_log.line, got_log.seqid) == (30, -5, -1, None)
    assert pb.severity_name(25) == "Level 25"  # a level Python allows and the enum lacks


def test_unpacked_from_tm_and_unknown_fields_are_read() -> None:
    body = (
        pb._len_field(1, b"rx") + pb._key(5, pb.VARINT) + pb.varint(7)
        + pb._key(5, pb.VARINT) + pb.varint(9) + pb._key(40, pb.I64) + bytes(8)
    )  # fmt: skip
    data = pb._len_field(1, b"\x08\x01\x10\x02") + pb._len_field(16, body)
    got = pb.decode_monitor_data(data)
    assert got.receiver is not None and got.receiver.from_tm == [7, 9]


def _log_bytes(**kw: Any) -> bytes:
    return pb.encode_log_data(pb.LogData(**kw))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_log_bytes()[:-1], "truncated"),
        (_log_bytes().replace(b"\x3a\x00", b""), "missing_field"),  # sourceFile left out
        (b"", "missing_field"),
        (b"\x08" + pb.varint(1 << 40) + _log_bytes()[2:], "out_of_range"),  # systemType
        (b"\x0a\x00" + _log_bytes()[2:], "bad_wire_type"),  # systemType as LEN
        (b"\x00\x00", "bad_field"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "bad_varint"),
    ],
)
def test_malformed_log_data_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(pb.PbError) as exc:
        pb.decode_log_data(data)
    assert exc.value.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "missing_field"),  # no time
        (pb._len_field(1, b"\x08\x01"), "missing_field"),  # TimeUTC without nsec
        (pb._len_field(1, b"\x08\x01\x10\x02") + pb._len_field(16, b"\x10\x01"), "missing_field"),
        (pb._len_field(1, b"\x08\x01\x10\x02") + b"\x82\x01\x05\x0a", "truncated"),
        (pb._len_field(1, b"\x08\x01\x10\x02") + b"\x82\x01\x02\x25\x00", "truncated"),
        (b"\x08\x01", "bad_wire_type"),  # time as a varint
    ],
)
def test_malformed_monitor_data_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(pb.PbError) as exc:
        pb.decode_monitor_data(data)
    assert exc.value.reason == reason


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_pb_error(data: bytes) -> None:
    for decode in (pb.decode_log_data, pb.decode_monitor_data):
        try:
            msg = decode(data)
        except pb.PbError:
            continue
        msg.tags()


@settings(max_examples=300)
@given(logs, monitors, st.data())
def test_cut_or_corrupted_messages_never_raise_anything_else(
    log: pb.LogData, mon: pb.MonitorData, data: st.DataObject
) -> None:
    for wire, decode in (
        (bytearray(pb.encode_log_data(log)), pb.decode_log_data),
        (bytearray(pb.encode_monitor_data(mon)), pb.decode_monitor_data),
    ):
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] = data.draw(st.integers(0, 255))
        wire = wire[: data.draw(st.integers(0, len(wire)))]
        try:
            decode(bytes(wire))
        except pb.PbError:
            pass
