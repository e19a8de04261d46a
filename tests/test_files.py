"""dplib.files: a file is replaced whole or not at all."""

from __future__ import annotations

import pytest

from dplib.files import atomic_write, atomic_write_text


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "table.csv"
    atomic_write_text(path, "old\n")
    seen = []
    atomic_write(path, lambda tmp: (seen.append(tmp), tmp.write_text("new\n")))
    assert path.read_text() == "new\n"
    # beside it, hidden, and not matching "*.csv": a reader globbing for finished files never sees it
    assert seen[0].parent == path.parent and seen[0].name.startswith(".") and seen[0].suffix == ".tmp"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_text(path, "{}\n")

    def half_then_fail(tmp):
        tmp.write_text('{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
