"""The long connection's wire format: one protobuf ``pbbp2.Frame`` per WebSocket binary message.

    message Header { required string key = 1; required string value = 2; }
    message Frame {
      required uint64 SeqID = 1; required uint64 LogID = 2; required int32 service = 3;
      required int32 method = 4; repeated Header headers = 5; optional string payload_encoding = 6;
      optional string payload_type = 7; optional bytes payload = 8; optional string LogIDNew = 9;
    }

Encoded and decoded here by hand (varints and length-delimited fields, forty lines) instead of
pulling protobuf and lark-oapi in for one message type. ``method`` 0 is a control frame (``type``
header ``ping``/``pong``), 1 a data frame (``type`` ``event``/``card``, with ``message_id``,
``sum``, ``seq``, ``trace_id``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONTROL, DATA = 0, 1


class FrameError(ValueError):
    """Bytes that are not a Frame."""


@dataclass(slots=True, kw_only=True)
class Frame:
    seq_id: int = 0
    log_id: int = 0
    service: int = 0
    method: int = CONTROL
    headers: list[tuple[str, str]] = field(default_factory=list)
    payload_encoding: str = ""
    payload_type: str = ""
    payload: bytes = b""
    log_id_new: str = ""

    def header(self, key: str) -> str | None:
        return next((v for k, v in self.headers if k == key), None)


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32/int64 negatives are ten-byte varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def encode(frame: Frame) -> bytes:
    out = [
        _field(1, frame.seq_id),
        _field(2, frame.log_id),
        _field(3, frame.service),
        _field(4, frame.method),
    ]
    for key, value in frame.headers:
        out.append(_field(5, _field(1, key.encode()) + _field(2, value.encode())))
    for number, text in ((6, frame.payload_encoding), (7, frame.payload_type)):
        if text:
            out.append(_field(number, text.encode()))
    if frame.payload:
        out.append(_field(8, frame.payload))
    if frame.log_id_new:
        out.append(_field(9, frame.log_id_new.encode()))
    return b"".join(out)


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    found: list[tuple[int, int | bytes]] = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise FrameError("truncated varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            found.append((number, varint()))
        elif wire == 2:
            size = varint()
            if pos + size > len(data):
                raise FrameError("truncated field")
            found.append((number, data[pos : pos + size]))
            pos += size
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise FrameError(f"unsupported wire type {wire}")
    return found


def decode(data: bytes) -> Frame:
    frame = Frame()
    try:
        for number, value in _fields(data):
            if isinstance(value, int):
                if number == 1:
                    frame.seq_id = value
                elif number == 2:
                    frame.log_id = value
                elif number == 3:
                    frame.service = value - (1 << 64) if value >= 1 << 63 else value
                elif number == 4:
                    frame.method = value
            elif number == 5:
                parts = {n: v for n, v in _fields(value)}
                key, val = parts.get(1, b""), parts.get(2, b"")
                if isinstance(key, bytes) and isinstance(val, bytes):
                    frame.headers.append((key.decode(), val.decode()))
            elif number == 6:
                frame.payload_encoding = value.decode()
            elif number == 7:
                frame.payload_type = value.decode()
            elif number == 8:
                frame.payload = value
            elif number == 9:
                frame.log_id_new = value.decode()
    except UnicodeDecodeError as exc:
        raise FrameError("a string field that is not UTF-8") from exc
    return frame
