"""Checkpoint folders of a TeamTR run: names, atomic commit, the resume pointer, bounded disk use.

Under ``trainer.default_local_dir``::

    global_step_S/            after stage S: every agent's weights/optimizer (<agent>/), data.pt, teamtr_state.json
    stage_S_update_U/         inside stage S, after its U-th update (``teamtr.save_every_update``): the agents changed
                              since the last checkpoint (<agent>/); the others are referenced by path in the state's
                              cursor (``agent_dirs``), data.pt (the loader *before* stage S's prompts were drawn)
    teamtr_latest.txt         the folder to resume from; written last, atomically: a folder counts only once named here
    latest_checkpointed_iteration.txt   verl's tracker (stage ends only), kept for verl's own tools

A folder is written under ``.tmp_<name>`` and renamed when complete, so a kill at any point leaves either the previous
complete checkpoint or the new one. Pure filesystem code: no torch, no Ray.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional

TRACKER = "teamtr_latest.txt"
VERL_TRACKER = "latest_checkpointed_iteration.txt"
TMP_PREFIX = ".tmp_"
_STAGE = re.compile(r"^global_step_(\d+)$")
_UPDATE = re.compile(r"^stage_(\d+)_update_(\d+)$")


def stage_folder(stage: int) -> str:
    return f"global_step_{stage}"


def update_folder(stage: int, done: int) -> str:
    return f"stage_{stage}_update_{done}"


def stages_done(folder: str | Path) -> int:
    """Completed stages when resuming from ``folder``: S for ``global_step_S``, S − 1 inside stage S."""
    name = Path(str(folder).rstrip("/")).name
    if match := _STAGE.match(name):
        return int(match.group(1))
    if match := _UPDATE.match(name):
        return int(match.group(1)) - 1
    raise ValueError(f"{folder} is not a teamtr checkpoint folder: expected global_step_S or stage_S_update_U")


@contextlib.contextmanager
def writing(root: str | Path, name: str) -> Iterator[Path]:
    """Yield a scratch folder; on a clean exit it becomes ``root/name`` in one rename (a leftover scratch folder from
    a killed writer is discarded first)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    yield tmp
    final, old = root / name, root / f"{TMP_PREFIX}old_{name}"
    if final.exists():  # re-running a stage after resuming from an earlier folder: moved aside, never half-deleted
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def commit(root: str | Path, name: str, stage_end: Optional[int] = None) -> None:
    """Make ``root/name`` the checkpoint to resume from (and verl's tracker point at a stage end)."""
    _write_atomic(Path(root) / TRACKER, name)
    if stage_end is not None:
        _write_atomic(Path(root) / VERL_TRACKER, str(stage_end))


def latest(root: str | Path) -> Optional[Path]:
    """The committed folder to resume from, or None. Falls back to verl's tracker (runs of earlier versions)."""
    root = Path(root)
    for tracker, folder_of in ((TRACKER, lambda text: text), (VERL_TRACKER, lambda text: stage_folder(int(text)))):
        path = root / tracker
        if path.exists():
            text = path.read_text().strip()
            if text:
                folder = root / folder_of(text)
                if folder.is_dir():
                    return folder
    return None


def resume_folder(trainer) -> Optional[str]:
    """The folder a run resumes from, or None, under verl's ``trainer.resume_mode`` semantics (``trainer`` is the
    ``trainer`` block; ``auto``: the last committed folder under ``default_local_dir``; relative paths are taken
    from the working directory, as verl does)."""
    mode = trainer.resume_mode
    if mode == "disable":
        return None
    if mode == "auto":
        root = trainer.default_local_dir
        root = root if os.path.isabs(root) else os.path.join(os.getcwd(), root)
        folder = latest(root)
        return None if folder is None else str(folder)
    if mode == "resume_path":
        path = trainer.resume_from_path
        return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    raise ValueError(f"trainer.resume_mode={mode!r} is not valid: choose one of auto, disable, resume_path")


def collect_garbage(root: str | Path, keep_stage_ends: Optional[int], referenced: Iterable[str]) -> list[str]:
    """Remove scratch folders, in-stage folders that nothing references and stage ends beyond the newest
    ``keep_stage_ends`` (None: keep all). ``referenced``: folder names the latest checkpoint needs. Returns the
    removed names."""
    root = Path(root)
    keep = {Path(name).parts[0] for name in referenced}
    stage_ends = sorted((int(m.group(1)), p.name) for p in root.iterdir() if (m := _STAGE.match(p.name)))
    if keep_stage_ends is not None and keep_stage_ends > 0:
        keep |= {name for _, name in stage_ends[-keep_stage_ends:]}
    else:
        keep |= {name for _, name in stage_ends}
    removed = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name in keep:
            continue
        if path.name.startswith(TMP_PREFIX) or _UPDATE.match(path.name) or _STAGE.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
