"""Atomic writes (infinitystar.fileio): nothing partial, nothing left behind, a full disk named (issue 16, 6 and 8)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from infinitystar import fileio
from infinitystar.checkpoints import save_safetensors
from infinitystar.fileio import DiskFullError, atomic_output, atomic_write_text, sweep_stale_temp_files

Usage = namedtuple("Usage", "total used free")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    dead = tmp_path / f".model.{_dead_pid()}-0123456789ab.tmp.safetensors"
    dead.write_bytes(b"half a file")
    alive = tmp_path / f".other.{os.getpid()}-0123456789ab.tmp.json"  # a live writer's: kept
    alive.write_bytes(b"{")
    unrelated = tmp_path / ".hidden.tmp"
    unrelated.write_bytes(b"x")
    fileio._swept.discard(tmp_path.resolve())
    atomic_write_text(tmp_path / "note.txt", "hello")
    assert not dead.exists() and alive.exists() and unrelated.exists()
    assert (tmp_path / "note.txt").read_text() == "hello"
    assert sweep_stale_temp_files(tmp_path) == []


def test_written_files_get_the_mode_of_a_plain_open(tmp_path):
    umask = os.umask(0o022)
    try:
        save_safetensors({"w": torch.zeros(3)}, tmp_path / "w.safetensors")  # safetensors itself writes 0600
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_not_enough_space_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda _p: Usage(10 << 20, 9 << 20, 1 << 20))
    with pytest.raises(DiskFullError, match=r"not enough space on /\S* to write .*w\.safetensors: 4\.0 MiB needed, "
                                            r"1\.0 MiB free") as info:
        save_safetensors({"w": torch.zeros(1 << 20)}, tmp_path / "w.safetensors")
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_hits_a_full_disk_is_one_named_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda _p: Usage(10 << 20, 10 << 20, 0))
    with pytest.raises(DiskFullError, match=r"disk full: /\S* could not take .*out\.bin \(0\.0 MiB free\)"), \
            atomic_output(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer library's own words for ENOSPC")  # e.g. SafetensorError
    assert list(tmp_path.iterdir()) == []
    # With space left, the writer's own error stays as it was.
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda _p: Usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="something else"), atomic_output(tmp_path / "out.bin"):
        raise RuntimeError("something else")


def test_an_unwritable_folder_names_the_destination_not_the_temp_file(tmp_path, monkeypatch, capsys):
    from infinitystar.errors import run_command

    def refuse(path, *_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(fileio.os, "open", refuse)
    code = run_command("convert", lambda: atomic_write_text(tmp_path / "out" / "model.json", "{}"))
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"infinitystar convert: error: cannot write {tmp_path}/out/model.json: no permission to create " \
                  f"files in {tmp_path}/out\n"
    assert ".tmp" not in err


def test_a_file_where_a_folder_must_be_is_named(tmp_path):
    from infinitystar.fileio import make_folder

    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"cannot use .*runs/a/b as the run folder: .*runs is a file"):
        make_folder(tmp_path / "runs" / "a" / "b", "run folder")
    (tmp_path / "out.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot write .*out\.mp4: it is a folder"), \
            atomic_output(tmp_path / "out.mp4"):
        pass
