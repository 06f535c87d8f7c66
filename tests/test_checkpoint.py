"""Atomic checkpoint writes: a crash mid-save leaves the previous checkpoint as the newest complete one."""
import pytest

from ernie_core.train import checkpoint as ckpt


def _write_ok(step):
    def write(tmp):
        (tmp / "weights.bin").write_bytes(b"x" * step)
        (tmp / ckpt.TRAINER_STATE).write_text('{"global_step": %d}' % step)

    return write


def test_crash_mid_save_keeps_last_good(tmp_path):
    ckpt.write_atomically(tmp_path / "checkpoint-10", _write_ok(10))

    def crash(tmp):
        (tmp / "weights.bin").write_bytes(b"partial")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        ckpt.write_atomically(tmp_path / "checkpoint-20", crash)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert not (tmp_path / "checkpoint-20").exists()
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]


def test_folder_without_trainer_state_is_not_resumed(tmp_path):
    ckpt.write_atomically(tmp_path / "checkpoint-5", _write_ok(5))
    (tmp_path / "checkpoint-9").mkdir()  # e.g. copied by hand, incomplete
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-5"


def test_rotation_keeps_newest(tmp_path):
    for s in (1, 2, 3, 10):
        ckpt.write_atomically(tmp_path / f"checkpoint-{s}", _write_ok(s))
    ckpt.rotate(tmp_path, 2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 10]  # numeric, not lexical order


def test_resave_same_step_replaces(tmp_path):
    ckpt.write_atomically(tmp_path / "checkpoint-4", _write_ok(4))
    ckpt.write_atomically(tmp_path / "checkpoint-4", _write_ok(7))
    assert (tmp_path / "checkpoint-4" / "weights.bin").read_bytes() == b"x" * 7
