"""What crosses between processes: request metadata, the records it carries, and errors.

Pure functions, no sockets: every value a carrier moves must come back equal after a trip
through JSON (and, for metadata, through an HTTP header), and every error of the tree must
come back as the same class with the same message.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multicloud.comm import wire
from multicloud.comm.http import MAX_HEADER
from multicloud.core import errors
from multicloud.core.config import ClusterConfig
from multicloud.core.errors import (
    ClusterError,
    DiskFull,
    InvalidChunkId,
    MulticloudError,
    NodeUnavailable,
    ReplicaRefused,
    StorageError,
    TransferTimeout,
    from_wire,
    to_wire,
)
from multicloud.core.messages import NodeAddress
from multicloud.core.network import Link, Location, NetworkTopology
from multicloud.core.types import MAX_PREFIX_ON_WIRE, BlobInfo, Chunk, ReplicaAck
from wire_support import example_error

HEX = "0123456789abcdef"
ORIGIN = Location("aws", "us-east-1")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)
metas = st.dictionaries(st.text(), json_values, max_size=6)


def through_header(meta: dict[str, Any]) -> dict[str, Any]:
    """meta after encode_meta, as an HTTP header value, and decode_meta."""
    header = wire.encode_meta(meta)
    header.encode("ascii")  # any text survives as \\u escapes
    assert "\n" not in header
    assert "\r" not in header
    return wire.decode_meta(header)


# -- metadata --------------------------------------------------------------------------------

@settings(deadline=None)  # a busy CI box must not fail a pure function on time
@given(metas)
def test_meta_survives_a_header(meta: dict[str, Any]) -> None:
    assert through_header(meta) == meta
    assert wire.copy_meta(meta) == meta


def test_copy_meta_is_what_json_makes_of_it() -> None:
    """In-process carriers copy through JSON too, so a value HTTP would change changes."""
    odd: dict[Any, Any] = {"pair": (1, 2), 3: "x"}
    assert wire.copy_meta(odd) == {"pair": [1, 2], "3": "x"}
    with pytest.raises(TypeError):
        wire.copy_meta({"raw": b"bytes"})  # bytes belong in the body, never in metadata


@pytest.mark.parametrize("text", ["[]", "1", '"x"', "null", "{", "", "{'a': 1}"])
def test_decode_meta_wants_a_json_object(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - json's own messages vary
        wire.decode_meta(text)


@settings(deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="/"), min_size=1),
       st.text(min_size=1))
def test_sender_round_trip(cloud: str, region: str) -> None:
    sender = Location(cloud, region)
    assert wire.decode_sender(wire.encode_sender(sender)) == sender


def test_no_sender_or_a_malformed_one_is_none() -> None:
    assert wire.encode_sender(None) is None
    for text in (None, "", "no-slash"):
        assert wire.decode_sender(text) is None


# -- records ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [None, b"", b"half a line", bytes(range(256)),
                                    b"x" * MAX_PREFIX_ON_WIRE])
def test_chunk_json_round_trip(prefix: bytes | None) -> None:
    chunk = Chunk(chunk_id="ab" * 32, file="dir/ü.csv", index=3, offset=3 * 65536,
                  size_bytes=65536, source_cloud="gcp", path=Path("/src/dir/ü.csv"),
                  record_format="csv", csv_columns=7, at_file_end=False, line_prefix=prefix,
                  raw_xxh3="c" * 32, data=b"never sent")
    meta = chunk.to_json()
    assert "never sent" not in json.dumps(meta)
    assert "/src/" not in json.dumps(meta)  # the orchestrator's local path stays home
    back = Chunk.from_json(through_header(meta))
    assert back == Chunk(chunk_id="ab" * 32, file="dir/ü.csv", index=3, offset=3 * 65536,
                         size_bytes=65536, source_cloud="gcp", record_format="csv",
                         csv_columns=7, at_file_end=False, line_prefix=prefix,
                         raw_xxh3="c" * 32)
    assert back.line_prefix == prefix
    assert back.path is None
    assert back.data is None


def test_a_long_line_prefix_stays_home() -> None:
    chunk = Chunk("ab" * 32, "f.jsonl", 1, 10, 10, "aws", line_prefix=b"y" * (MAX_PREFIX_ON_WIRE
                                                                               + 1))
    meta = chunk.to_json()
    assert "line_prefix" not in meta
    assert Chunk.from_json(through_header(meta)).line_prefix is None  # "unknown": unchecked


@settings(deadline=None)
@given(st.builds(
    Chunk,
    chunk_id=st.text(HEX, min_size=64, max_size=64),
    file=st.text(min_size=1),
    index=st.integers(0, 2**31),
    offset=st.integers(0, 2**62),
    size_bytes=st.integers(0, 2**40),
    source_cloud=st.sampled_from(["aws", "gcp", "azure"]),
    record_format=st.sampled_from([None, "jsonl", "csv"]),
    csv_columns=st.none() | st.integers(1, 1000),
    at_file_end=st.booleans(),
    line_prefix=st.none() | st.binary(max_size=MAX_PREFIX_ON_WIRE + 64),
    raw_xxh3=st.none() | st.text(HEX, min_size=32, max_size=32),
))
def test_any_chunk_survives_a_header(chunk: Chunk) -> None:
    back = Chunk.from_json(through_header(chunk.to_json()))
    prefix = chunk.line_prefix
    expected = prefix if prefix is None or len(prefix) <= MAX_PREFIX_ON_WIRE else None
    assert back.line_prefix == expected
    back.line_prefix = chunk.line_prefix
    assert back == chunk


def test_the_largest_chunk_metadata_fits_the_header_limit() -> None:
    # The longest relative path Linux allows, in the characters JSON escapes widest
    # (astral ones become two \\u escapes), with the longest prefix that travels.
    chunk = Chunk("ab" * 32, "😀" * (4096 // 4), 2**31, 2**62, 2**40, "aws",
                  record_format="jsonl", csv_columns=None, at_file_end=False,
                  line_prefix=bytes(MAX_PREFIX_ON_WIRE), raw_xxh3="c" * 32)
    assert len(wire.encode_meta({"chunk": chunk.to_json()})) < MAX_HEADER


def test_blob_ack_address_and_link_round_trip() -> None:
    info = BlobInfo("cd" * 32, raw_size=10, blob_size=7, blob_checksum="f" * 32, codec="zstd")
    assert BlobInfo.from_json(through_header(info.to_json())) == info
    ack = ReplicaAck("gcp-node-1", "cd" * 32, "f" * 32, 7, 0.25)
    assert ReplicaAck.from_json(through_header(ack.to_json())) == ack
    for address in (NodeAddress("gcp-node-1", Location("gcp", "us-central1"), "http://h:1"),
                    NodeAddress("aws-node-2", ORIGIN)):
        assert NodeAddress.from_json(through_header(address.to_json())) == address
    topology = NetworkTopology(ClusterConfig())
    for dst in (ORIGIN, Location("aws", "us-west-2"), Location("gcp", "us-central1")):
        link = topology.link(ORIGIN, dst)
        assert Link.from_json(through_header(link.to_json())) == link
    cross = Link.from_json(through_header(topology.link(
        ORIGIN, Location("gcp", "us-central1")).to_json()))
    assert cross.cross_cloud
    assert cross.name == "aws/us-east-1->gcp/us-central1"


def test_a_link_of_an_unknown_kind_is_refused() -> None:
    raw = NetworkTopology(ClusterConfig()).link(ORIGIN, ORIGIN).to_json()
    raw["kind"] = "wormhole"
    with pytest.raises(ValueError, match="wormhole"):
        Link.from_json(raw)


# -- errors ----------------------------------------------------------------------------------

CODED = sorted(errors._CODES.items(), key=lambda item: item[1])


@pytest.mark.parametrize(("cls", "code"), CODED, ids=[code for _, code in CODED])
def test_every_error_comes_back_as_itself(cls: type[MulticloudError], code: str) -> None:
    exc = example_error(cls)
    body = to_wire(exc)
    assert body["error"] == code
    assert code in wire.STATUS  # every code has its HTTP status
    assert wire.status_of(body) == wire.STATUS[code]
    back = from_wire(through_header(body))
    assert type(back) is cls
    assert str(back) == str(exc)
    assert type(wire.round_trip(exc)) is cls
    if isinstance(exc, NodeUnavailable):
        # The culprit travels: the node that could not be reached, not the one that said so.
        assert isinstance(back, NodeUnavailable)
        assert (back.node_id, back.reason) == ("gcp-node-9", "connection refused")
    if isinstance(exc, InvalidChunkId):
        assert isinstance(back, InvalidChunkId)
        assert back.chunk_id == "not-hex"
    if isinstance(exc, TransferTimeout):
        assert isinstance(back, TransferTimeout)
        assert (back.src, back.dst, back.timeout_s) == ("aws-node-1", "gcp-node-2", 2.5)


def test_an_error_without_a_code_travels_as_its_nearest_ancestor() -> None:
    refused = ReplicaRefused("gcp-node-1", "ab" * 32, DiskFull("no room"))
    back = wire.round_trip(refused)
    assert type(back) is ClusterError
    assert str(back) == str(refused)

    class Local(StorageError):
        pass

    assert type(wire.round_trip(Local("odd"))) is StorageError


@pytest.mark.parametrize(("body", "cls", "message"), [
    ({"error": "no-such-code", "message": "from a newer node"}, MulticloudError,
     "from a newer node"),
    ({"error": "unknown_node"}, MulticloudError, "unknown_node"),
    ({}, MulticloudError, "unknown error"),
    ({"error": "node_unavailable", "message": "m"}, NodeUnavailable, "node ? is unavailable: m"),
    ({"error": "transfer_timeout"}, TransferTimeout, "transfer ? -> ? timed out after 0.00s"),
])
def test_from_wire_makes_do_with_what_it_gets(body: dict[str, Any],
                                              cls: type[MulticloudError], message: str) -> None:
    back = from_wire(body)
    assert type(back) is cls
    assert str(back) == message
    assert wire.status_of(body) == wire.STATUS.get(str(body.get("error")), 500)


def test_internal_error_is_a_logged_storage_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="multicloud.comm.wire")
    try:
        raise KeyError("boom")
    except KeyError as exc:
        body = wire.internal_error("aws-node-1", exc)
    assert body == {"error": "storage",
                    "message": "node aws-node-1 failed: KeyError: 'boom'"}
    assert wire.status_of(body) == 500
    assert type(from_wire(body)) is StorageError
    [record] = caplog.records
    assert record.exc_info is not None  # the traceback of the bug is in the node's log
