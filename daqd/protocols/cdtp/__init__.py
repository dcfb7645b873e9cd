"""CDTP2, Constellation's data transmission protocol: sans-IO encode and decode of its messages.

A CDTP2 message is one ZeroMQ frame holding four concatenated msgpack objects: the protocol string
"CDTP\\x02", the sender's canonical name, the message type (DATA, BOR, EOR) and an array of records
`[seq, tags, blocks]`. BOR and EOR carry exactly two records whose tags are (user tags,
configuration) and (user tags, run metadata). Decoded blocks are memoryviews of the received frame,
so a DATA message is never copied block by block. Timestamps in tags (msgpack ext -1, in any of its
three widths) decode as `msgpack.Timestamp`, which keeps every value exactly and packs again as is.

The package, by job: `messages` (the message types, shared wire constants), `decoding` (`decode`,
`decode_frame`, `decode_frame_plain` and its PlainData table), `encoding` (`Encoder`, `encode`,
and the plain records' fast paths for transmitters). Import from `daqd.protocols.cdtp`.
"""

from daqd.protocols.cdtp.decoding import (
    MIN_RECORD_BYTES,
    UNIFORM_MIN_RECORDS,
    PlainData,
    WrongProtocol,
    decode,
    decode_frame,
    decode_frame_plain,
)
from daqd.protocols.cdtp.encoding import (
    Encoder,
    encode,
    plain_record_head,
    plain_record_tail,
    plain_records,
    record_seq_head,
    seq32_record_head,
    seq_width_end,
)
from daqd.protocols.cdtp.messages import (
    MAX_MESSAGE_BYTES,
    PROTOCOL,
    BeginOfRun,
    Block,
    Data,
    DataRecord,
    EndOfRun,
    Message,
    MessageType,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MIN_RECORD_BYTES",
    "PROTOCOL",
    "UNIFORM_MIN_RECORDS",
    "BeginOfRun",
    "Block",
    "Data",
    "DataRecord",
    "Encoder",
    "EndOfRun",
    "Message",
    "MessageType",
    "PlainData",
    "WrongProtocol",
    "decode",
    "decode_frame",
    "decode_frame_plain",
    "encode",
    "plain_record_head",
    "plain_record_tail",
    "plain_records",
    "record_seq_head",
    "seq32_record_head",
    "seq_width_end",
]
