"""formats/files.py: a file is replaced whole or not at all, whatever writes its content."""

from __future__ import annotations

import pytest

from histoserve.formats.files import write_atomically


@pytest.mark.parametrize("content, expected", [
    ("text é\n", "text é\n".encode()),
    (b"\x00bytes", b"\x00bytes"),
    (lambda handle: handle.write(b"by a writer"), b"by a writer"),
], ids=["text", "bytes", "writer"])
def test_the_content_replaces_the_file_in_one_rename(tmp_path, content, expected):
    target = tmp_path / "sub" / "file.bin"
    write_atomically(target, "old")
    write_atomically(target, content)
    assert target.read_bytes() == expected and target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]  # no temporary left


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    write_atomically(target, b"old")

    def broken(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, broken)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
