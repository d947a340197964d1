"""``fusionvae.files``: a file is replaced whole or left as it was (reports, tables, result.json,
the results page, fused images and the classifier are written through it)."""

from __future__ import annotations

import pytest

from fusionvae.files import replaced, write_csv, write_text


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "metrics.md", "old\n")
    with pytest.raises(RuntimeError), replaced(path) as f:
        f.write("half of the new")
        raise RuntimeError("disk gone")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.md"]


def test_text_and_csv_are_written_whole(tmp_path):
    assert write_text(tmp_path / "a.md", "x\n").read_text() == "x\n"
    rows = [{"K": 0, "nelbo": 1.5, "extra": "left out"}, {"K": 1, "nelbo": 1.25}]
    path = write_csv(rows, ["K", "nelbo"], tmp_path / "a.csv")
    assert path.read_text().splitlines() == ["K,nelbo", "0,1.5", "1,1.25"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.md"]
