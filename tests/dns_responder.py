"""A DNS server on loopback UDP that answers one name with several IPv4 addresses.

The tests need a name with several A records, as a coordinator deployment behind DNS has,
without touching the machine's resolver configuration. gRPC's own (c-ares) resolver queries
it when the target names it as the DNS authority: `dns://127.0.0.1:PORT/name:port`. It speaks
just enough of RFC 1035 for that: a query for the name and type A gets the addresses; any other
type of the name gets an empty answer (NOERROR, so AAAA is "none", not a failure); any other
name gets NXDOMAIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
import typing
from collections.abc import AsyncIterator, Sequence

_type_a = 1
_class_in = 1
_ttl_s = 60
_flags_response = 0x8180  # QR, recursion desired and available, NOERROR
_rcode_nxdomain = 3


def _question_end(packet: bytes) -> int:
    """Offset just past the question's name (uncompressed labels, as resolvers send them)."""
    offset = 12
    while packet[offset]:
        offset += 1 + packet[offset]
    return offset + 1


def _answer(packet: bytes, name: str, addresses: Sequence[str]) -> bytes:
    query_id, _, question_count = struct.unpack("!HHH", packet[:6])
    end = _question_end(packet)
    labels, offset = [], 12
    while packet[offset]:
        labels.append(packet[offset + 1 : offset + 1 + packet[offset]].decode("ascii"))
        offset += 1 + packet[offset]
    qtype, _ = struct.unpack("!HH", packet[end : end + 4])
    question = packet[12 : end + 4]
    if question_count != 1 or ".".join(labels).lower() != name.lower():
        header = struct.pack("!HHHHHH", query_id, _flags_response | _rcode_nxdomain, 1, 0, 0, 0)
        return header + question
    records = [
        # 0xC00C: a pointer to the question's name at offset 12.
        struct.pack("!HHHIH", 0xC00C, _type_a, _class_in, _ttl_s, 4)
        + ipaddress.IPv4Address(address).packed
        for address in (addresses if qtype == _type_a else ())
    ]
    header = struct.pack("!HHHHHH", query_id, _flags_response, 1, len(records), 0, 0)
    return header + question + b"".join(records)


class _Responder(asyncio.DatagramProtocol):
    def __init__(self, name: str, addresses: Sequence[str]) -> None:
        self._name = name
        self._addresses = addresses
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport does not subclass DatagramTransport.
        self._transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self._transport is not None
        with contextlib.suppress(IndexError, struct.error, UnicodeDecodeError):
            self._transport.sendto(_answer(data, self._name, self._addresses), addr)


@contextlib.asynccontextmanager
async def dns_responder(name: str, addresses: Sequence[str]) -> AsyncIterator[str]:
    """Serves `name` -> `addresses` (IPv4); yields the server's `host:port` for a dns: URI."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Responder(name, addresses), local_addr=("127.0.0.1", 0)
    )
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        yield f"{host}:{port}"
    finally:
        transport.close()
