"""Reading DCP checkpoints without running code from them.

torch.distributed.checkpoint's FileSystemReader reads `.metadata` with plain `pickle.load`, and
its planner loads non-tensor entries with `torch.load(weights_only=False)`: a crafted checkpoint
directory runs whatever it likes in `evaluate`, `export`, resume or `init_from`, and the
checksums in checkpoint.json prove nothing against someone who rewrites them too. `SafeReader`
unpickles `.metadata` through the pattern of the pickle documentation's "Restricting Globals":
only DCP's metadata classes and the plain torch/pathlib types they hold can be named, then
checks the result has the shape this trainer writes (tensor entries only, data files inside the
checkpoint directory), so nothing reaches the unsafe byte path. Every load goes through it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader  # not re-exported by the package
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata

from data_pipeline.storage import is_local
from trainer.checkpoint.store import CheckpointError

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a name -> torch.layout lookup
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}
"""What a `.metadata` may name (module -> names); torch's dtypes (torch.float32, ...) besides."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's metadata never holds")


def _refused(where: Path | str, why: object) -> CheckpointError:
    return CheckpointError(f"{where}: not a checkpoint this trainer wrote ({why}); refusing to load it")


def _checked(metadata: Any, where: Path | str) -> Metadata:
    """`metadata` if it is what this trainer's saves write: tensors only, in files of the directory."""

    def refuse(why: str) -> CheckpointError:
        return _refused(where, why)

    if not isinstance(metadata, Metadata):
        raise refuse(f"it holds a {type(metadata).__name__}, not DCP Metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise refuse(f"entry {key!r} is a {type(entry).__name__}; only tensors are saved")
    for index, info in (metadata.storage_data or {}).items():
        name = getattr(info, "relative_path", None)
        if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo) and isinstance(name, str)):
            raise refuse("malformed storage index")
        if Path(name).name != name or name in ("", ".", ".."):
            raise refuse(f"entry {index.fqn!r} points outside the directory, at {name!r}")
        if info.transform_descriptors:
            raise refuse(f"entry {index.fqn!r} asks for stream transforms {info.transform_descriptors}")
    if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, StorageMeta):
        raise refuse("malformed storage_meta")
    return metadata


class _SafeMetadata:
    """`read_metadata` of DCP's readers, with `.metadata` read by `_MetadataUnpickler` and checked."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as e:
            raise _refused(path, e) from None
        metadata = _checked(metadata, path)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeReader(_SafeMetadata, dcp.FileSystemReader):
    """DCP's local file-system reader, its metadata read safely."""


class SafeFsspecReader(_SafeMetadata, FsspecReader):
    """DCP's fsspec reader (checkpoints on object stores), its metadata read safely."""


def safe_reader(path: Path) -> dcp.StorageReader:
    """The safe DCP reader for checkpoint directory `path`, local or an fsspec URL."""
    return SafeReader(path) if is_local(path) else SafeFsspecReader(str(path))


def read_metadata(path: Path) -> Metadata:
    """The checked DCP metadata of checkpoint directory `path`."""
    return safe_reader(path).read_metadata()
