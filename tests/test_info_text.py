"""`dataprune info` on text corpora: documents are read (not decoded as images), problems are
counted by reason with file and line, and the next step names the text metric."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile


def _info(path, *extra):
    p = subprocess.run([sys.executable, "-m", "dataprune", "info", str(path), *extra], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p


def test_info_reads_jsonl_documents_and_counts_bad_lines(tmp_path):
    f = tmp_path / "c.jsonl"
    lines = [json.dumps({"id": f"d{i}", "text": f"document {i}"}) for i in range(5)]
    lines += [json.dumps({"id": "x", "text": 3}), "not json"]
    f.write_text("\n".join(lines) + "\n")
    for extra in ((), ("--check",)):
        r = json.loads(_info(f, "--json", *extra).stdout)
        assert (r["samples"], r["ok"], r["documents"]) == (7, 5, 5)
        assert r["problems"] == {"bad_json": 1, "no_text": 1}
        assert any("line 7" in m for m in r["problem_examples"])
    out = _info(f, "--check").stdout
    assert "--metric text-dedup" in out and "decode_error" not in out


def test_info_reads_txt_and_json_members_of_a_tar(tmp_path):
    tar = tmp_path / "t-000000.tar"
    members = [("a.txt", b"first doc"), ("b.txt", b"\xff\xfe not utf-8"), ("c.json", b'{"text": "json doc"}'), ("d.cls", b"3")]
    with tarfile.open(tar, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    r = json.loads(_info(tar, "--json", "--check", "--text-column", "text").stdout)
    assert (r["ok"], r["documents"]) == (2, 2)
    assert r["problems"] == {"bad_utf8": 1, "no_text": 1}
    assert any("'b'" in m and "UTF-8" in m for m in r["problem_examples"])
    # without --text-column a tar is read as images (as export reads it): the documents are named, not read
    r = json.loads(_info(tar, "--json").stdout)
    assert (r["ok"], r["documents"], r["unread_documents"]) == (0, 0, 3)
    out = _info(tar).stdout
    assert "--text-column text" in out and "--metric text-dedup" in out


def test_info_on_images_still_suggests_an_image_metric(tmp_path):
    import numpy as np
    from PIL import Image

    d = tmp_path / "imgs" / "cat"
    d.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "0.png")
    p = _info(tmp_path / "imgs", "--check")
    assert "--metric el2n" in p.stdout
    assert json.loads(_info(tmp_path / "imgs", "--json").stdout)["documents"] == 0
