"""The transform chain and the blob envelope: round trips, tamper detection, record checks."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multicloud.blob import (
    MAGIC,
    TransformChain,
    blob_checksum,
    check_blob,
    decode_blob,
    inspect_blob,
    load_key,
)
from multicloud.core.config import EncryptionConfig, ProcessingConfig
from multicloud.core.errors import ConfigError, IntegrityError, ValidationFailed
from multicloud.core.types import Chunk

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ALL_CONFIGS = [
    ["validate"],
    ["validate", "compress"],
    ["validate", "encrypt"],
    ["validate", "compress", "encrypt"],
]
TEXT = b"".join(b'{"id": %d, "level": "INFO", "msg": "user logged in"}\n' % i for i in range(500))


def chain(*transforms: str, key: bytes | None = KEY, **cfg: object) -> TransformChain:
    processing = ProcessingConfig.model_validate({"transforms": list(transforms), **cfg})
    return TransformChain(processing, key if "encrypt" in transforms else None)


def make_chunk(
    data: bytes,
    fmt: str | None = None,
    *,
    offset: int = 0,
    at_file_end: bool = True,
    csv_columns: int | None = None,
    size_bytes: int | None = None,
) -> Chunk:
    return Chunk(
        chunk_id=hashlib.sha256(data).hexdigest(),
        file="logs/a." + (fmt or "bin"),
        index=3,
        offset=offset,
        size_bytes=len(data) if size_bytes is None else size_bytes,
        source_cloud="aws",
        record_format=fmt,
        csv_columns=csv_columns,
        at_file_end=at_file_end,
    )


def process(
    data: bytes,
    *transforms: str,
    fmt: str | None = None,
    offset: int = 0,
    at_file_end: bool = True,
    csv_columns: int | None = None,
) -> bytes:
    chunk = make_chunk(data, fmt, offset=offset, at_file_end=at_file_end, csv_columns=csv_columns)
    blob, _ = chain(*(transforms or ("validate",))).apply(chunk, data)
    return blob


# ---------------------------------------------------------------- round trips and codecs


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=64 * 1024), transforms=st.sampled_from(ALL_CONFIGS))
def test_round_trip(data: bytes, transforms: list[str]) -> None:
    c = chain(*transforms)
    chunk = make_chunk(data)
    blob, info = c.apply(chunk, data)
    assert decode_blob(blob, KEY, expected_chunk_id=chunk.chunk_id) == data
    assert info.chunk_id == chunk.chunk_id == hashlib.sha256(data).hexdigest()
    assert (info.raw_size, info.blob_size) == (len(data), len(blob))
    assert info.blob_checksum == blob_checksum(blob)
    assert check_blob(blob, chunk.chunk_id).chunk_id == chunk.chunk_id


@pytest.mark.parametrize("transforms", ALL_CONFIGS)
def test_memoryview_in_and_out(transforms: list[str]) -> None:
    blob, _ = chain(*transforms).apply(make_chunk(TEXT, "jsonl"), memoryview(TEXT))
    assert decode_blob(memoryview(blob), KEY) == TEXT


def test_compressible_text_is_zstd_and_smaller() -> None:
    blob, info = chain("validate", "compress").apply(make_chunk(TEXT, "jsonl"), TEXT)
    assert info.codec == "zstd"
    assert len(blob) < len(TEXT) / 4
    assert inspect_blob(blob).compressed


def test_random_bytes_are_stored_raw() -> None:
    data = os.urandom(100_000)
    blob, info = chain("validate", "compress").apply(make_chunk(data), data)
    assert info.codec == "raw"
    header = inspect_blob(blob)
    assert not header.compressed
    assert len(blob) == header.header_size + len(data)


def test_min_saving_decides_whether_compression_is_kept() -> None:
    # Half random, half zeros: compression saves a bit under 50%.
    data = os.urandom(50_000) + bytes(50_000)
    chunk = make_chunk(data)
    assert chain("compress", compression={"min_saving": 0.3}).apply(chunk, data)[1].codec == "zstd"
    assert chain("compress", compression={"min_saving": 0.6}).apply(chunk, data)[1].codec == "raw"


@pytest.mark.parametrize(
    ("transforms", "codec", "used"),
    [
        (["validate"], "raw", "raw"),
        (["validate", "compress"], "zstd", "zstd"),
        (["encrypt"], "raw+aes256gcm", "raw+aes256gcm"),
        (["compress", "encrypt"], "zstd+aes256gcm", "zstd+aes256gcm"),
    ],
)
def test_codec_names(transforms: list[str], codec: str, used: str) -> None:
    c = chain(*transforms)
    assert c.codec == codec
    assert c.apply(make_chunk(TEXT), TEXT)[1].codec == used


def test_envelope_header_layout() -> None:
    blob = process(TEXT, "validate", "compress", "encrypt")
    header = inspect_blob(blob)
    assert blob[:4] == MAGIC
    assert blob[4] == 0x03
    assert int.from_bytes(blob[5:13], "big") == len(TEXT) == header.raw_size
    assert blob[13:45].hex() == hashlib.sha256(TEXT).hexdigest() == header.chunk_id
    assert blob[45:61].hex() == header.payload_digest
    assert header.encrypted
    assert header.header_size == 73


def test_without_validate_the_chunk_id_is_trusted_but_decode_catches_it() -> None:
    data, other = b"abc", b"abd"
    blob, info = chain("compress").apply(make_chunk(other), data)
    assert info.chunk_id == hashlib.sha256(other).hexdigest()
    with pytest.raises(IntegrityError, match="SHA-256"):
        decode_blob(blob)


# ---------------------------------------------------------------- encryption and keys


def test_encrypted_blob_needs_the_right_key() -> None:
    blob = process(TEXT, "validate", "compress", "encrypt")
    assert TEXT[:20] not in blob
    assert decode_blob(blob, KEY) == TEXT
    with pytest.raises(IntegrityError, match="wrong key"):
        decode_blob(blob, OTHER_KEY)
    with pytest.raises(ConfigError, match="encrypted; provide the key"):
        decode_blob(blob)
    check_blob(blob)  # scrubbing needs no key


def test_each_encryption_uses_a_fresh_nonce() -> None:
    assert process(TEXT, "encrypt") != process(TEXT, "encrypt")


def test_encrypt_without_a_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULTICLOUD_ENCRYPTION_KEY", raising=False)
    cfg = ProcessingConfig(transforms=["validate", "encrypt"])
    with pytest.raises(ConfigError, match="encryption is on but no key"):
        TransformChain(cfg)
    with pytest.raises(ConfigError, match="MULTICLOUD_ENCRYPTION_KEY"):
        TransformChain.from_config(cfg)
    with pytest.raises(ConfigError, match="32 bytes"):
        TransformChain(cfg, b"short")


def test_from_config_reads_the_key_only_when_encrypting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTICLOUD_ENCRYPTION_KEY", "not a key")
    assert TransformChain.from_config(ProcessingConfig()).codec == "zstd"
    monkeypatch.setenv("MULTICLOUD_ENCRYPTION_KEY", KEY.hex())
    c = TransformChain.from_config(ProcessingConfig(transforms=["encrypt"]))
    blob, _ = c.apply(make_chunk(TEXT), TEXT)
    assert decode_blob(blob, KEY) == TEXT
    assert KEY.hex() not in repr(c)


def test_load_key_from_raw_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(KEY)
    assert load_key(EncryptionConfig(key_file=str(path))) == KEY


@pytest.mark.parametrize("text", [KEY.hex(), KEY.hex() + "\n", KEY.hex().upper() + "\r\n"])
def test_load_key_from_hex_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "key.hex"
    path.write_text(text, newline="")
    assert load_key(EncryptionConfig(key_file=str(path))) == KEY


def test_key_file_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", OTHER_KEY.hex())
    path = tmp_path / "key"
    path.write_bytes(KEY)
    assert load_key(EncryptionConfig(key_file=str(path), key_env="MY_KEY")) == KEY
    assert load_key(EncryptionConfig(key_env="MY_KEY")) == OTHER_KEY


def test_no_key_anywhere_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MY_KEY", raising=False)
    assert load_key(EncryptionConfig(key_env="MY_KEY")) is None


@pytest.mark.parametrize("content", [KEY[:31], KEY.hex()[:63].encode(), b"g" * 64, b""])
def test_bad_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="32 raw bytes or 64 hex") as info:
        load_key(EncryptionConfig(key_file=str(path)))
    assert str(path) in str(info.value)
    assert KEY.hex()[:16] not in str(info.value)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_key(EncryptionConfig(key_file=str(tmp_path / "nope")))


@pytest.mark.parametrize("value", [KEY.hex()[:62], KEY.hex()[:63] + "z", KEY.hex() + "00"])
def test_bad_key_env(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MY_KEY", value)
    with pytest.raises(ConfigError, match="MY_KEY") as info:
        load_key(EncryptionConfig(key_env="MY_KEY"))
    assert value not in str(info.value)


# ---------------------------------------------------------------- tamper detection

_SAMPLE = os.urandom(3000) + TEXT[:3000]
_BLOBS = {" ".join(t): process(_SAMPLE, *t) for t in ALL_CONFIGS}


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(_BLOBS)), where=st.floats(0, 1, exclude_max=True),
       xor=st.integers(1, 255))
def test_any_flipped_byte_is_detected(name: str, where: float, xor: int) -> None:
    blob = bytearray(_BLOBS[name])
    position = int(where * len(blob))
    blob[position] ^= xor
    with pytest.raises(IntegrityError):
        check_blob(bytes(blob))
    with pytest.raises(IntegrityError):
        decode_blob(bytes(blob), KEY)


@pytest.mark.parametrize("position", range(73))
def test_every_header_byte_is_covered(position: int) -> None:
    for blob in _BLOBS.values():
        bad = bytearray(blob)
        bad[position] ^= 0x01
        with pytest.raises(IntegrityError):
            check_blob(bytes(bad))


@pytest.mark.parametrize("cut", [0, 3, 60, 61, 72, -1, -16])
def test_truncated_blob(cut: int) -> None:
    for blob in _BLOBS.values():
        with pytest.raises(IntegrityError):
            decode_blob(blob[:cut], KEY)


def test_bad_magic_and_wrong_chunk() -> None:
    blob = _BLOBS["validate compress"]
    with pytest.raises(IntegrityError, match="magic"):
        inspect_blob(b"XXXX" + blob[4:])
    with pytest.raises(IntegrityError, match="expected chunk"):
        decode_blob(blob, expected_chunk_id="0" * 64)
    with pytest.raises(IntegrityError, match="expected chunk"):
        check_blob(blob, "0" * 64)


# ---------------------------------------------------------------- chunk validation


def test_checksum_mismatch_fails_validation() -> None:
    chunk = make_chunk(b"hello")
    with pytest.raises(ValidationFailed, match=r"chunk 3 of logs/a.bin: SHA-256"):
        chain("validate").apply(chunk, b"hellO")


def test_size_mismatch_fails_validation() -> None:
    chunk = make_chunk(b"hello", size_bytes=6)
    with pytest.raises(ValidationFailed, match="expected size_bytes=6"):
        chain("validate").apply(chunk, b"hello")


def test_records_are_not_parsed_when_disabled() -> None:
    data = b"not json\n"
    blob, _ = chain("validate", parse_records=False).apply(make_chunk(data, "jsonl"), data)
    assert decode_blob(blob) == data


# ---------------------------------------------------------------- JSONL


def test_jsonl_bad_line_is_named() -> None:
    data = b'{"a": 1}\n\n[1, 2]\n{"b": }\n"x"\n'
    with pytest.raises(ValidationFailed, match=r"chunk 3 of logs/a.jsonl: line 4 .*not valid JSON"):
        process(data, fmt="jsonl")


@pytest.mark.parametrize(
    "line",
    [b"1,2", b'{"a":1}{"b":2}', b'{"a":1},{"b":2}', b"1 2", b"[1", b"2]", b'"abc', b"{", b"}",
     b'"a":1', b"nul", b"NaN", b"1,"],
)
def test_jsonl_line_with_other_than_one_document_fails(line: bytes) -> None:
    data = b'{"ok": true}\n' + line + b'\n{"ok": true}\n'
    with pytest.raises(ValidationFailed, match="line 2"):
        process(data, fmt="jsonl")


def test_jsonl_values_spanning_lines_fail() -> None:
    with pytest.raises(ValidationFailed, match="line 1"):
        process(b'[1,\n2]\n', fmt="jsonl")
    with pytest.raises(ValidationFailed, match="line 2"):
        process(b'[1]\n[[1\n2]]\n3],[4\n', fmt="jsonl")


def test_jsonl_blank_and_crlf_lines_pass() -> None:
    data = b'{"a": 1}\r\n\r\n  \n\n1\r\n"s"\n'
    assert decode_blob(process(data, fmt="jsonl")) == data


def test_jsonl_partial_first_line_passes_when_offset_is_past_zero() -> None:
    data = b'garbage": 3}\n{"a": 1}\n'
    process(data, fmt="jsonl", offset=4096)
    with pytest.raises(ValidationFailed, match="line 1"):
        process(data, fmt="jsonl", offset=0)


def test_jsonl_partial_last_line_passes_unless_at_file_end() -> None:
    data = b'{"a": 1}\n{"b": '
    process(data, fmt="jsonl", at_file_end=False)
    with pytest.raises(ValidationFailed, match="line 2"):
        process(data, fmt="jsonl", at_file_end=True)
    # Ending on a newline, the last line is complete even when the file goes on.
    with pytest.raises(ValidationFailed, match="line 2"):
        process(data + b"\n", fmt="jsonl", at_file_end=False)


def test_jsonl_error_gives_the_file_byte() -> None:
    data = b'tail}\n{"a": 1}\n{oops}\n'
    with pytest.raises(ValidationFailed, match=r"line 3 \(byte 1015 of the file\)"):
        process(data, fmt="jsonl", offset=1000)


_FRAGMENTS = [b"1", b"2", b",", b"[", b"]", b"{", b"}", b'"a"', b":", b" ", b'"', b"true", b"\r"]


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.lists(st.sampled_from(_FRAGMENTS), max_size=6).map(b"".join),
                      max_size=8))
def test_jsonl_agrees_with_parsing_each_line(lines: list[bytes]) -> None:
    data = b"\n".join(lines) + b"\n"

    def valid(line: bytes) -> bool:
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            return not line.strip(b" \t\r")
        return True

    if all(valid(line) for line in lines):
        process(data, fmt="jsonl")
    else:
        with pytest.raises(ValidationFailed):
            process(data, fmt="jsonl")


# ---------------------------------------------------------------- CSV


def test_csv_wrong_field_count_fails() -> None:
    data = b"a,b,c\n1,2,3\n\n4,5\n6,7,8\n"
    with pytest.raises(ValidationFailed, match=r"line 4 .*has 2 fields, expected 3 .*header"):
        process(data, fmt="csv")


def test_csv_rows_must_agree_without_a_header() -> None:
    data = b"partial\n1,2,3\n4,5,6\n7,8\n"
    with pytest.raises(ValidationFailed, match=r"line 4 .*has 2 fields, expected 3"):
        process(data, fmt="csv", offset=10)
    process(data[:-4], fmt="csv", offset=10)


def test_csv_columns_are_honoured() -> None:
    data = b"x,y\n1,2,3\n4,5,6\n"
    process(data, fmt="csv", offset=10, csv_columns=3)
    with pytest.raises(ValidationFailed, match=r"line 2 .*expected 2 .*csv_columns"):
        process(data, fmt="csv", offset=10, csv_columns=2)


def test_csv_partial_lines_and_crlf() -> None:
    data = b"1,2,3\r\n\r\n4,5,6\r\n7,"
    process(data, fmt="csv", offset=10, at_file_end=False)
    with pytest.raises(ValidationFailed, match="line 4"):
        process(data, fmt="csv", offset=0)
    process(b"a,b\n", fmt="csv")
    process(b"", fmt="csv")


def test_quoted_csv() -> None:
    data = b'id,text,n\n1,"hello, world",2\n2,"say ""hi""\nacross lines",3\n3,plain,4\n'
    process(data, fmt="csv")
    with pytest.raises(ValidationFailed, match=r"line 6 .*has 4 fields, expected 3"):
        process(data + b'4,"a,b",5,6\n', fmt="csv")
    with pytest.raises(ValidationFailed, match="not valid CSV"):
        process(data + b'5,"a"b,6\n', fmt="csv")


def test_quoted_csv_chunk_may_start_or_end_inside_a_quoted_field() -> None:
    # The previous chunk ended inside "...", a field that spans lines.
    data = b'inside\nstill, inside",1,2\n4,"x",6\n7,"open\n'
    process(data, fmt="csv", offset=100, at_file_end=False)
    with pytest.raises(ValidationFailed):
        process(data, fmt="csv", offset=100, at_file_end=True)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.lists(st.sampled_from(["", "a", "bb", " ", ","]), max_size=5)
                               .map("".join), st.booleans()), min_size=1, max_size=8),
       csv_columns=st.none() | st.integers(1, 3))
def test_unquoted_csv_agrees_with_the_csv_module(
    rows: list[tuple[str, bool]], csv_columns: int | None
) -> None:
    data = "".join(row + ("\r\n" if crlf else "\n") for row, crlf in rows).encode()
    records = [r for r in csv.reader(io.StringIO(data.decode(), newline="")) if r]
    expected = csv_columns if csv_columns is not None else (len(records[0]) if records else 0)
    if all(len(r) == expected for r in records):
        process(data, fmt="csv", csv_columns=csv_columns)
    else:
        with pytest.raises(ValidationFailed):
            process(data, fmt="csv", csv_columns=csv_columns)


def test_chain_is_safe_to_share_between_worker_threads() -> None:
    c = chain("validate", "compress", "encrypt")
    inputs = [TEXT[: 1000 * i] + os.urandom(i) for i in range(1, 33)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        blobs = list(pool.map(lambda d: c.apply(make_chunk(d), d)[0], inputs))
    assert [decode_blob(b, KEY) for b in blobs] == inputs
