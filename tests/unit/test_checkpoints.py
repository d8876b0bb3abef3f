"""Checkpoints a kill can leave behind: a half-written `.tmp` folder is never read, a truncated file
falls back to the previous intact checkpoint."""

import torch

from rredcot.runlog import checkpoints, latest_checkpoint, save_checkpoint


def _save(run, step, tiny_model):
    model, tok = tiny_model
    return save_checkpoint(run, step, model, tok, {"step": step, "drawn": 0}, keep=5)


def test_a_tmp_folder_is_not_a_checkpoint_and_is_cleaned_up(tmp_path, tiny_model):
    _save(tmp_path, 2, tiny_model)
    (tmp_path / "checkpoints" / "step_000004.tmp").mkdir()  # a kill during the write of step 4
    assert [p.name for p in checkpoints(tmp_path)] == ["step_000002"]
    assert latest_checkpoint(tmp_path).name == "step_000002"
    _save(tmp_path, 6, tiny_model)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_model, capsys):
    _save(tmp_path, 2, tiny_model)
    newest = _save(tmp_path, 4, tiny_model)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert latest_checkpoint(tmp_path).name == "step_000002"
    assert "damaged" in capsys.readouterr().err
    torch.save({"step": 2}, newest / "trainer_state.pt")  # the files stay for a person to inspect
    assert newest.exists()
