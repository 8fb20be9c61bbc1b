"""Sharded checkpoints with torch.distributed.checkpoint, one module per concern:

checkpointer.py   Checkpointer: save, commit, load, cadence (what the training loop calls)
resume.py         which checkpoint to resume or fine-tune from, agreed by every rank
store.py          the directory layout: step directories, commit, retention, checksums
compat.py         what must match to resume (model, optimizers, dataset schema)
reshard.py        loading into another plan: shape checks, row-wise state, grown tables
safe_reader.py    reading DCP metadata without unpickling code (every load goes through it)
"""

from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.compat import IncompatibleCheckpoint, check_compatible
from trainer.checkpoint.resume import Resume, checkpoint_root, find_init, find_resume
from trainer.checkpoint.store import CheckpointError, committed, locate, read_meta, step_dir_name, verify_files

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "IncompatibleCheckpoint",
    "Resume",
    "check_compatible",
    "checkpoint_root",
    "committed",
    "find_init",
    "find_resume",
    "locate",
    "read_meta",
    "step_dir_name",
    "verify_files",
]
