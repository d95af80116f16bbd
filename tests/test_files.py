"""Atomic writes: a file or folder is replaced whole, or left as it was when the write fails."""

import pytest

from nanotune.files import (
    remove_stale_temporaries, replace_folder, temporary_folder, write_atomically, write_lines_atomically, write_text_atomically,
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


def test_replace_folder_swaps_a_whole_folder_for_another_and_touches_no_sibling(tmp_path):
    model = tmp_path / "model"
    (tmp_path / "model.tmp").mkdir()  # a user's own folders beside the destination
    (tmp_path / "model.old").mkdir()
    first = temporary_folder(model)
    assert list(first.iterdir()) == []
    (first / "a.safetensors").write_text("1")
    replace_folder(first, model)
    second = temporary_folder(model)
    (second / "b.safetensors").write_text("2")
    replace_folder(second, model)
    assert [p.name for p in model.iterdir()] == ["b.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.old", "model.tmp"]


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f"final.tmp-{dead_pid}-abc123").mkdir()
    (tmp_path / f"final.old-{dead_pid}-xyz").mkdir()
    live = temporary_folder(tmp_path / "final")  # this process's own, in use
    (tmp_path / "final.tmp").mkdir()  # not a name nanotune makes: never touched
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [f"final.old-{dead_pid}-xyz", f"final.tmp-{dead_pid}-abc123"]
    assert live.exists() and (tmp_path / "final.tmp").exists()
