"""The strict tar reader and the deterministic header writer."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from dataprune import tario
from dataprune.errors import SourceError


def members_of(data: bytes, **kw):
    return list(tario.iter_members(io.BytesIO(data), "x.tar", **kw))


def test_offsets_point_at_member_bytes(mk):
    long = "d/" + "n" * 120 + ".jpg"  # needs a pax header: offset covers it
    files = [("a.jpg", b"A" * 700), (long, b"L" * 10), ("ü-key.txt", "é".encode()), ("empty.cls", b"")]
    data = mk.tar_bytes(files)
    got = members_of(data)
    assert [m.name for m, _ in got] == [n for n, _ in files]
    for (m, payload), (_, want) in zip(got, files):
        assert payload == want
        assert data[m.data_offset : m.data_offset + m.size] == want
        assert m.offset % 512 == 0 and m.end % 512 == 0 and m.end - m.data_offset >= m.size
    # the long-named member starts at its extended header, right after the previous member ends
    assert got[1][0].offset == got[0][0].end
    assert got[1][0].data_offset - got[1][0].offset >= 1024
    # GNU long names too
    gnu = mk.tar_bytes([(long, b"x")], fmt=tarfile.GNU_FORMAT)
    (m, payload), = members_of(gnu)
    assert m.name == long and payload == b"x" and m.offset == 0


def test_link_and_device_kinds(mk):
    data = mk.tar_bytes([("a.jpg", b"1"), ("s.jpg", {"type": tarfile.SYMTYPE, "linkname": "a.jpg"}),
                         ("h.jpg", {"type": tarfile.LNKTYPE, "linkname": "a.jpg"}),
                         ("c.jpg", {"type": tarfile.CHRTYPE}), ("f.jpg", {"type": tarfile.FIFOTYPE}),
                         ("dir", {"type": tarfile.DIRTYPE})])
    kinds = {m.name: m.kind for m, _ in members_of(data)}
    assert kinds == {"a.jpg": "file", "s.jpg": "symlink", "h.jpg": "hardlink", "c.jpg": "device", "f.jpg": "device"}


@pytest.mark.parametrize("cut", [512 + 100, 1024 + 512, 2048 + 10])
def test_truncated_archive_names_member(mk, cut):
    data = mk.tar_bytes([("a.jpg", b"A" * 600), ("a.cls", b"1"), ("b.jpg", b"B" * 10)])
    it = tario.iter_members(io.BytesIO(data[:cut]), "x.tar")
    with pytest.raises(SourceError) as e:
        list(it)
    assert e.value.reason == "truncated_tar"
    assert "x.tar" in str(e.value)


def test_missing_end_marker_is_truncation(mk):
    data = mk.tar_bytes([("a.jpg", b"A" * 600)])
    m, _ = members_of(data)[0]
    with pytest.raises(SourceError) as e:
        members_of(data[: m.end])
    assert e.value.reason == "truncated_tar" and "'a.jpg'" in str(e.value)


@pytest.mark.parametrize("payload, reason", [(b"", "not_tar"), (b"hello world\n" * 100, "not_tar"),
                                             (b"short text", "not_tar"), (b"\x00" * 1024, None)])
def test_not_a_tar(payload, reason):
    if reason is None:  # an empty archive (just the end marker) is a valid tar with no members
        assert members_of(payload) == []
        return
    with pytest.raises(SourceError) as e:
        members_of(payload)
    assert e.value.reason == reason and "x.tar" in str(e.value)


def test_corrupt_header_after_first_member(mk):
    data = bytearray(mk.tar_bytes([("a.jpg", b"A" * 10), ("b.jpg", b"B" * 10)]))
    data[1024 + 5] ^= 0xFF  # damage the second header (breaks its checksum)
    with pytest.raises(SourceError) as e:
        members_of(bytes(data))
    assert e.value.reason == "corrupt_tar" and "after member 'a.jpg'" in str(e.value)


def test_malformed_pax_header_raises_not_hangs():
    hdr = bytearray(tario.member_header("x", 9))
    hdr[156:157] = b"x"  # pax extended header
    hdr[148:156] = b"        "
    hdr[148:156] = b"%06o\x00 " % (sum(hdr))
    body = b"0 path=a\n".ljust(512, b"\x00")  # record length 0: a reader that trusts it loops forever
    data = bytes(hdr) + body + tario.member_header("a.jpg", 1) + b"1".ljust(512, b"\x00") + b"\x00" * 1024
    with pytest.raises(SourceError) as e:
        members_of(data)
    assert e.value.reason == "corrupt_tar"


@pytest.mark.parametrize("name, size", [("000001.jpg", 0), ("a/b/c.cls", 1), ("x" * 100, 5), ("k.jpg", 8**11 - 1),
                                        ("x" * 101, 3), ("é.jpg", 2), ("k.jpg", 8**11)])
def test_member_header_matches_tarfile(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    assert tario.member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_vectorised_headers_match_member_header():
    names = ["000001.jpg", "a/b.cls", "x" * 100, "k.json"]
    sizes = np.array([0, 1, 12345, 8**11 - 1], dtype=np.int64)
    name_field = np.zeros((len(names), 100), np.uint8)
    for i, n in enumerate(names):
        name_field[i, : len(n)] = np.frombuffer(n.encode(), np.uint8)
    out = tario.headers_array(name_field, sizes)
    for i, (n, s) in enumerate(zip(names, sizes)):
        assert out[i].tobytes() == tario.member_header(n, int(s))


def test_writer_output_reads_back_everywhere():
    body = b"".join(tario.member_header(f"k{i}.txt", i) + bytes([65 + i]) * i + tario.padding(i) for i in range(5))
    data = body + tario.end_of_archive(len(body))
    assert len(data) % tario.RECORD == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        infos = tf.getmembers()
        assert [m.name for m in infos] == [f"k{i}.txt" for i in range(5)]
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o444 and m.uname == "" for m in infos)
    assert [p for _, p in members_of(data)] == [bytes([65 + i]) * i for i in range(5)]


def _read_all(f, path):
    out = []
    try:
        for m, data in tario.iter_members(f, path):
            out.append((m, data))
    except SourceError as e:
        return out, (e.reason, str(e))
    return out, None


@pytest.mark.parametrize("chunk", [512, 1536, 1 << 22])
def test_fast_path_for_files_matches_strict_reader(mk, tmp_path, monkeypatch, chunk):
    """Plain files go through the chunked fast path; on clean and on damaged archives alike it
    yields the same members and raises the same error as the strict reader on the same bytes."""
    monkeypatch.setattr(tario, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    files = []
    for i in range(40):
        files.append((f"{i:04d}.jpg", rng.bytes(int(rng.integers(0, 3000)))))
        files.append((f"{i:04d}.cls", str(i % 7).encode()))
        if i == 17:
            files.append(("d/" + "n" * 120 + ".jpg", b"long"))  # pax header in the middle
        if i == 23:
            files.append(("s.jpg", {"type": tarfile.SYMTYPE, "linkname": "a.jpg"}))
    clean = mk.tar_bytes(files)
    cases = {"clean": clean, "gnu": mk.tar_bytes(files[:30], fmt=tarfile.GNU_FORMAT),
             "ustar": mk.tar_bytes(files[:30], fmt=tarfile.USTAR_FORMAT), "empty": b""}
    ends = [m.end for m, _ in members_of(clean)]
    for cut in (100, ends[5] - 7, ends[5], ends[5] + 300, len(clean) - 1024):
        cases[f"cut{cut}"] = clean[:cut]
    for at in (ends[3] + 10, ends[3] + 150, ends[50] + 130, ends[60] + 1000):  # name, size, checksum, data bytes
        bad = bytearray(clean)
        bad[at] ^= 0x5A
        cases[f"flip{at}"] = bytes(bad)
    def header(size_field: bytes, good: bool) -> bytes:
        h = bytearray(512)
        h[0:1], h[100:108], h[124:136], h[156:157] = b"a", b"0000644\0", size_field.ljust(12, b"\0"), b"0"
        h[257:265], h[148:156] = b"ustar\x0000", b" " * 8
        if good:
            h[148:156] = b"%06o\0 " % sum(h)
        return bytes(h)

    for field in (b"-1", b"-1000", b"-2000", b"7" * 11):  # negative sizes; a size far beyond the file
        for good in (True, False):
            cases[f"size{field[:5].decode()}{good}"] = header(field, good) + bytes(1024)
    huge = bytearray(clean)
    huge[ends[2] + 124] = ord("7")  # one corrupt byte declares a ~8 GiB member: must not be allocated
    cases["huge"] = bytes(huge)
    for name, data in cases.items():
        p = tmp_path / f"{name}.tar"
        p.write_bytes(data)
        with open(p, "rb") as f:
            fast = _read_all(f, str(p))
        strict = _read_all(io.BytesIO(data), str(p))
        assert fast == strict, name
    assert len(_read_all(open(tmp_path / "clean.tar", "rb"), "x")[0]) == len(files)


def test_pipe_with_extension_headers_reads_like_a_file(mk):
    """A non-seekable stream (FIFO, pipe) never takes the seeking fast path."""
    import os
    import threading

    data = mk.tar_bytes([("a.jpg", b"1"), ("d/" + "n" * 120 + ".jpg", b"2")])
    r, w = os.pipe()
    threading.Thread(target=lambda: (os.write(w, data), os.close(w)), daemon=True).start()
    with os.fdopen(r, "rb") as f:
        got = [(m.name, d) for m, d in tario.iter_members(f, "pipe")]
    assert got == [("a.jpg", b"1"), ("d/" + "n" * 120 + ".jpg", b"2")]
