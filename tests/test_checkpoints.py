"""Checkpoint folders (teamtr_verl.checkpoints): atomic writes, the resume pointer, what garbage collection keeps."""

import pytest

from teamtr_verl import checkpoints


def make(root, *names):
    for name in names:
        (root / name).mkdir(parents=True)


def test_a_folder_exists_only_once_complete(tmp_path):
    with pytest.raises(RuntimeError):
        with checkpoints.writing(tmp_path, "global_step_2") as scratch:
            (scratch / "alice").mkdir()
            raise RuntimeError("killed while writing")
    assert not (tmp_path / "global_step_2").exists()  # only the scratch folder is left, never the named one
    assert checkpoints.latest(tmp_path) is None
    with checkpoints.writing(tmp_path, "global_step_2") as scratch:  # a rerun discards the leftover
        (scratch / "bob").mkdir()
    assert sorted(p.name for p in (tmp_path / "global_step_2").iterdir()) == ["bob"]
    assert checkpoints.latest(tmp_path) is None  # complete but not committed: not resumed from
    checkpoints.commit(tmp_path, "global_step_2", stage_end=2)
    assert checkpoints.latest(tmp_path) == tmp_path / "global_step_2"
    assert (tmp_path / checkpoints.VERL_TRACKER).read_text() == "2"
    with checkpoints.writing(tmp_path, "global_step_2") as scratch:  # rewritten (a rerun after an earlier resume)
        (scratch / "carol").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step_2"]  # nothing set aside is left
    assert sorted(p.name for p in (tmp_path / "global_step_2").iterdir()) == ["carol"]


def test_latest_prefers_the_teamtr_pointer_and_falls_back_to_verls_tracker(tmp_path):
    make(tmp_path, "global_step_3", "stage_4_update_1")
    (tmp_path / checkpoints.VERL_TRACKER).write_text("3")  # a run of an earlier version wrote only this
    assert checkpoints.latest(tmp_path) == tmp_path / "global_step_3"
    checkpoints.commit(tmp_path, "stage_4_update_1")
    assert checkpoints.latest(tmp_path) == tmp_path / "stage_4_update_1"
    assert (tmp_path / checkpoints.VERL_TRACKER).read_text() == "3"  # verl's tracker names stage ends only


@pytest.mark.parametrize("name, done", [("global_step_7", 7), ("stage_8_update_2", 7), ("stage_1_update_1/", 0)])
def test_stages_done(name, done):
    assert checkpoints.stages_done(f"/ckpt/{name}") == done


def test_stages_done_refuses_other_folders():
    with pytest.raises(ValueError, match="global_step_S or stage_S_update_U"):
        checkpoints.stages_done("/ckpt/step_3")


def test_garbage_collection_keeps_the_newest_stage_ends_and_every_referenced_folder(tmp_path):
    make(tmp_path, "global_step_1", "global_step_2", "global_step_3", "stage_4_update_1", "stage_4_update_2",
         ".tmp_stage_4_update_3", "my_notes")
    # the latest checkpoint (stage 4, 2 updates done) holds bob and refers to alice as saved after update 1 and to
    # carol as saved at stage 2 (unchanged since): those folders stay even beyond the one stage end to keep
    removed = checkpoints.collect_garbage(tmp_path, 1, ["stage_4_update_2", "stage_4_update_1/alice",
                                                        "stage_4_update_2/bob", "global_step_2/carol"])
    assert sorted(removed) == [".tmp_stage_4_update_3", "global_step_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_2", "global_step_3", "my_notes",
                                                          "stage_4_update_1", "stage_4_update_2"]
    # no limit: every stage end stays, unreferenced in-stage folders go
    assert checkpoints.collect_garbage(tmp_path, None, ["global_step_3"]) == ["stage_4_update_1", "stage_4_update_2"]
