"""Protobuf's wire format, walked by hand: the entries of a message located by their tags
and lengths, so that a reader can skip what it does not need (a slice's weights) without
reading those bytes, in a memory map of the file."""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path


@contextlib.contextmanager
def mapped(path: Path, above: int):
    """The file's bytes: read whole when smaller than `above`, else a read-only memory map
    (whose pages are read only where touched)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < above:
            yield f.read()
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield data


def entries(data, start: int, end: int):
    """(field number, wire type, entry start, entry end, payload start) of each entry."""
    at = start
    while at < end:
        entry = at
        key, at = varint(data, at, end)
        number, wire = key >> 3, key & 7
        payload = at
        if wire == 0:
            _, at = varint(data, at, end)
        elif wire == 1:
            at += 8
        elif wire == 2:
            length, payload = varint(data, at, end)
            at = payload + length
        elif wire == 5:
            at += 4
        else:
            raise ValueError(f"wire type {wire} at byte {entry}")
        if at > end or number == 0:
            raise ValueError(f"an entry at byte {entry} runs past its end")
        yield number, wire, entry, at, payload


def varint(data, at: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= end or shift > 63:
            raise ValueError(f"a truncated number at byte {at}")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)
