"""Sharded checkpoints (torch.distributed.checkpoint): save, commit, find, resume, fine-tune."""

from trainer.checkpoint.checkpointer import (
    CheckpointError,
    Checkpointer,
    IncompatibleCheckpoint,
    Resume,
    check_compatible,
    committed,
    config_differences,
    fault,
    find_init,
    find_resume,
    locate,
    lr_state,
    read_meta,
    schema_differences,
    set_lr_state,
    set_rng_state,
    step_dir_name,
    truncate_records,
    verify_files,
)

__all__ = [
    "CheckpointError", "Checkpointer", "IncompatibleCheckpoint", "Resume", "check_compatible", "committed",
    "config_differences", "fault", "find_init", "find_resume", "locate", "lr_state", "read_meta",
    "schema_differences", "set_lr_state", "set_rng_state", "step_dir_name", "truncate_records", "verify_files",
]
