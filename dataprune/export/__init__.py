"""Export: the kept samples as WebDataset shards, Hugging Face parquet, an image folder or a key list.

The face of the package. ``base`` holds the writer contract and registry; each writer module
(``wds``, ``parquet``, ``folder``, ``keylist``) registers its writer when it is imported, here, in the
order of ``FORMATS``; ``run`` is the driver, which finds writers only through the registry.
"""

from __future__ import annotations

from ..config import ExportConfig
from ..errors import DataPruneError
from ..manifest import check_complete
from .base import INDEX, WRITERS, ExportStats, FastPath, Writer, list_writers, register_writer, unregister_writer, writer_class
from .wds import WdsWriter  # the writer modules register themselves: wds, parquet, folder, list
from .parquet import ParquetWriter
from .folder import FolderWriter
from .keylist import ListWriter
from .jsonl import JsonlWriter
from .run import export, output_order


def __getattr__(name: str):
    if name == "FORMATS":  # the registered names, always the registry's view (never a second list)
        return tuple(list_writers())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ExportConfig", "export", "check_complete", "FORMATS", "DataPruneError", "ExportStats", "FastPath", "Writer", "WRITERS", "register_writer", "unregister_writer",
           "writer_class", "list_writers", "output_order", "INDEX", "WdsWriter", "ParquetWriter", "FolderWriter", "ListWriter",
           "JsonlWriter"]
