"""Atomic writes: a file or folder is replaced whole, or left as it was when the write fails."""

import pytest

from nanotune.files import (
    replace_folder, temporary_folder, write_atomically, write_lines_atomically, write_text_atomically,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.toml"
    write_text_atomically(path, "old")

    def fail_half_way(temporary):
        temporary.write_text("half of the new", encoding="utf-8")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail_half_way)
    assert path.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]
    write_text_atomically(path, "new")
    assert path.read_text(encoding="utf-8") == "new"


def test_lines_are_streamed_from_a_generator_one_per_line(tmp_path):
    path = tmp_path / "out.jsonl"
    write_lines_atomically(path, (f'{{"i": {i}}}' for i in range(3)))
    assert path.read_text(encoding="utf-8") == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'


def test_replace_folder_swaps_a_whole_folder_for_another(tmp_path):
    model = tmp_path / "model"
    stale = temporary_folder(model)
    (stale / "leftover").write_text("from a killed run")
    first = temporary_folder(model)
    assert list(first.iterdir()) == []  # a leftover temporary folder is emptied first
    (first / "a.safetensors").write_text("1")
    replace_folder(first, model)
    second = temporary_folder(model)
    (second / "b.safetensors").write_text("2")
    replace_folder(second, model)
    assert [p.name for p in model.iterdir()] == ["b.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
