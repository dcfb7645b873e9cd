"""The hand-written CDTS protobuf codec (daqd.protocols.ssdaq_pb) against Google's protobuf runtime.

The reference classes are built at run time from a descriptor written here with the field numbers
of SSDAQ's CDTS.proto (proto2), so both sides are independent implementations of one schema.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daqd.protocols import ssdaq_pb as pb

protobuf = pytest.importorskip("google.protobuf")
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # noqa: E402

F = descriptor_pb2.FieldDescriptorProto


def _reference_classes() -> tuple[Any, Any, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="daqd_test_cdts.proto", package="CTA.ACTL.CDTS", syntax="proto2"
    )
    enum = fdp.enum_type.add(name="TriggerType")
    for name, n in (("ReadoutTrigger", 1), ("BusyTrigger", 2), ("MuonTrigger", 8)):
        enum.value.add(name=name, number=n)
    enum = fdp.enum_type.add(name="WhiteRabbitStatus")
    for name, n in (("Uninitialized", 1), ("TrackPhase", 5), ("WaitOffsetStable", 6)):
        enum.value.add(name=name, number=n)

    def field(msg: Any, name: str, number: int, ftype: int, **kw: Any) -> None:
        msg.field.add(name=name, number=number, type=ftype, label=F.LABEL_OPTIONAL, **kw)

    ts = fdp.message_type.add(name="TimeStamp")
    field(ts, "seconds", 1, F.TYPE_UINT64)
    field(ts, "pico_seconds", 2, F.TYPE_UINT64)
    for i, name in enumerate(("index", "tai_hi", "tai_lo", "cyc", "tdc_hi", "tdc_lo"), 3):
        field(ts, name, i, F.TYPE_UINT32)
    tm = fdp.message_type.add(name="TriggerMessage")
    field(tm, "telescope", 1, F.TYPE_UINT32)
    field(tm, "event_counter", 2, F.TYPE_UINT64)
    field(tm, "pps_counter", 3, F.TYPE_UINT64)
    field(tm, "clock_counter", 4, F.TYPE_UINT64)
    field(tm, "time", 5, F.TYPE_MESSAGE, type_name=".CTA.ACTL.CDTS.TimeStamp")
    field(tm, "type", 6, F.TYPE_ENUM, type_name=".CTA.ACTL.CDTS.TriggerType")
    field(tm, "status", 7, F.TYPE_ENUM, type_name=".CTA.ACTL.CDTS.WhiteRabbitStatus")
    field(tm, "pattern", 8, F.TYPE_FIXED64)
    tb = fdp.message_type.add(name="TriggerBunch")
    field(tb, "telescope", 1, F.TYPE_UINT32)
    field(tb, "bunch_counter", 2, F.TYPE_UINT64)
    tb.field.add(
        name="triggers",
        number=3,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".CTA.ACTL.CDTS.TriggerMessage",
    )
    field(tb, "arrival_time", 4, F.TYPE_MESSAGE, type_name=".CTA.ACTL.CDTS.TimeStamp")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("CTA.ACTL.CDTS.TimeStamp")),
        get(pool.FindMessageTypeByName("CTA.ACTL.CDTS.TriggerMessage")),
        get(pool.FindMessageTypeByName("CTA.ACTL.CDTS.TriggerBunch")),
    )


RefTimeStamp, RefTriggerMessage, RefTriggerBunch = _reference_classes()

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
opt32 = st.none() | u32
opt64 = st.none() | u64

timestamps = st.builds(
    pb.TimeStamp,
    seconds=opt64, pico_seconds=opt64, index=opt32, tai_hi=opt32, tai_lo=opt32,
    cyc=opt32, tdc_hi=opt32, tdc_lo=opt32,
)  # fmt: skip
messages = st.builds(
    pb.TriggerMessage,
    telescope=opt32, event_counter=opt64, pps_counter=opt64, clock_counter=opt64,
    time=st.none() | timestamps, type=st.sampled_from([1, 2, 8]),
    status=st.sampled_from([1, 5, 6]), pattern=opt64,
)  # fmt: skip
bunches = st.builds(
    pb.TriggerBunch,
    telescope=opt32,
    bunch_counter=opt64,
    triggers=st.lists(messages, max_size=6),
    arrival_time=st.none() | timestamps,
)


def _ts_from_ref(ref: Any) -> pb.TimeStamp:
    return pb.TimeStamp(
        **{k: getattr(ref, k) if ref.HasField(k) else None for k in pb.TIMESTAMP_FIELDS}
    )


def _msg_from_ref(ref: Any) -> pb.TriggerMessage:
    def opt(k: str) -> Any:
        return getattr(ref, k) if ref.HasField(k) else None

    return pb.TriggerMessage(
        telescope=opt("telescope"),
        event_counter=opt("event_counter"),
        pps_counter=opt("pps_counter"),
        clock_counter=opt("clock_counter"),
        time=_ts_from_ref(ref.time) if ref.HasField("time") else None,
        type=ref.type,
        status=ref.status,
        pattern=opt("pattern"),
    )


@settings(deadline=None, max_examples=200)
@given(bunches)
def test_our_bytes_parse_in_googles_runtime_to_the_same_values(bunch: pb.TriggerBunch) -> None:
    data = pb.encode_trigger_bunch(bunch)
    ref = RefTriggerBunch.FromString(data)
    assert (ref.telescope if ref.HasField("telescope") else None) == bunch.telescope
    assert (ref.bunch_counter if ref.HasField("bunch_counter") else None) == bunch.bunch_counter
    assert [_msg_from_ref(m) for m in ref.triggers] == bunch.triggers
    if bunch.arrival_time is None:
        assert not ref.HasField("arrival_time")
    else:
        assert _ts_from_ref(ref.arrival_time) == bunch.arrival_time
    assert pb.decode_trigger_bunch(data) == bunch


@settings(deadline=None, max_examples=200)
@given(bunches)
def test_googles_bytes_decode_here_and_each_trigger_keeps_its_own_bytes(
    bunch: pb.TriggerBunch,
) -> None:
    ref = RefTriggerBunch.FromString(pb.encode_trigger_bunch(bunch))
    wire = ref.SerializeToString()
    got = pb.decode_trigger_bunch(wire)
    assert got == bunch
    # what SSDAQ re-published: each TriggerMessage serialized on its own
    assert [m.raw for m in got.triggers] == [m.SerializeToString() for m in ref.triggers]
    for m in got.triggers:
        assert pb.decode_trigger_message(m.raw) == m


def test_defaults_unknown_fields_and_any_field_order() -> None:
    # absent type/status take the proto2 defaults (ReadoutTrigger, TrackPhase)
    ref = RefTriggerMessage(event_counter=5)
    got = pb.decode_trigger_message(ref.SerializeToString())
    assert (got.type, got.status, got.event_counter, got.telescope) == (1, 5, 5, None)
    assert got.tags() == {
        "event_counter": 5,
        "trigger_type": "ReadoutTrigger",
        "wr_status": "TrackPhase",
    }
    # unknown fields of every wire type are skipped; fields in reverse order; last value wins
    data = (
        pb._key(8, pb.I64) + (7).to_bytes(8, "little")
        + pb._key(99, pb.VARINT) + pb.varint(1 << 40)
        + pb._key(98, pb.I32) + bytes(4)
        + pb._key(97, pb.LEN) + pb.varint(3) + b"abc"
        + pb._key(2, pb.VARINT) + pb.varint(1)
        + pb._key(2, pb.VARINT) + pb.varint(2)
    )  # fmt: skip
    got = pb.decode_trigger_message(data)
    assert (got.pattern, got.event_counter) == (7, 2)
    assert got.raw == data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x10", "truncated"),  # bunch_counter key, no value
        (b"\x10\x80", "truncated"),  # a varint that never ends
        (b"\x10" + b"\xff" * 10 + b"\x01", "bad_varint"),
        (b"\x1a\x05\x10\x01", "truncated"),  # a trigger of 5 bytes, 2 there
        (b"\x1a\x02\x12\x00", "bad_wire_type"),  # TriggerMessage event_counter as LEN
        (b"\x08\x80\x80\x80\x80\x10", "out_of_range"),  # telescope 2**32: not a uint32
        (b"\x0b", "bad_wire_type"),  # a group start
        (b"\x1f", "bad_wire_type"),  # wire type 7
        (b"\x00\x01", "bad_field"),  # field number 0
        (b"\x1a\x03\x2a\x01\xff", "truncated"),  # TimeStamp with a cut varint
        (b"\x12\x01\x00", "bad_wire_type"),  # bunch_counter as LEN
    ],
)
def test_malformed_bunches_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(pb.PbError) as exc:
        pb.decode_trigger_bunch(data)
    assert exc.value.reason == reason


@settings(deadline=None, max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_pb_error(data: bytes) -> None:
    try:
        bunch = pb.decode_trigger_bunch(data)
    except pb.PbError:
        return
    for m in bunch.triggers:
        m.tags()
        assert pb.decode_trigger_message(m.raw) == m


@settings(deadline=None, max_examples=300)
@given(bunches, st.data())
def test_cut_or_corrupted_bunches_never_raise_anything_else(
    bunch: pb.TriggerBunch, data: st.DataObject
) -> None:
    wire = bytearray(pb.encode_trigger_bunch(bunch))
    if wire:
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] = data.draw(st.integers(0, 255))
        wire = wire[: data.draw(st.integers(0, len(wire)))]
    try:
        pb.decode_trigger_bunch(bytes(wire))
    except pb.PbError:
        pass
