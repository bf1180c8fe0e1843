"""The run-directory contract and atomic writes (dspark_train/layout.py)."""
import os

import numpy as np
import pytest

from dspark_train.layout import RunDir, atomic_path, replace_dir, write_atomic


def test_write_atomic_leaves_only_the_file(tmp_path):
    write_atomic(tmp_path / "a.json", "{}")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_atomic_path_keeps_the_suffix_and_the_pid(tmp_path):
    with atomic_path(tmp_path / "s.npz") as tmp:
        assert tmp.suffix == ".npz" and str(os.getpid()) in tmp.name  # numpy keeps the name; writers never share it
        np.savez(tmp, a=np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]
    assert np.load(tmp_path / "s.npz")["a"].tolist() == [0, 1, 2]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    write_atomic(tmp_path / "x.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert (tmp_path / "x.txt").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_replace_dir_swaps_in_the_new_copy(tmp_path):
    dest, new = tmp_path / "final", tmp_path / ".final.new"
    dest.mkdir()
    (dest / "w").write_text("old")
    new.mkdir()
    (new / "w").write_text("new")
    replace_dir(new, dest)
    assert (dest / "w").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["final"]


def test_latest_checkpoint_needs_a_complete_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    ckpt = run.checkpoint(7)
    ckpt.mkdir(parents=True)
    write_atomic(run.checkpoints / "latest", ckpt.name)
    assert run.latest_checkpoint() is None  # no trainer_state.json yet: an interrupted save
    (ckpt / "trainer_state.json").write_text("{}")
    assert run.latest_checkpoint() == ckpt
