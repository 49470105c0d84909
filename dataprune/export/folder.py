"""Image-folder writer: ``<class>/<name>.<ext>``, as torchvision's ImageFolder reads it."""

from __future__ import annotations

import os
import shutil
from typing import Any

from ..sources.base import pick_image
from .base import Writer, register_writer

STAGING = ".dataprune-folder.tmp"  # folder exports are built here, then moved into place


@register_writer("folder")
class FolderWriter(Writer):
    """``<class>/<name>.<ext>`` (unlabelled samples at the top): hard links to the source files when
    possible, else copies. Built in a hidden staging directory, moved into place by :meth:`close`;
    its ``index.json`` lists what it moved there (``entries``), which the next export removes."""

    scratch = (STAGING,)

    def __init__(self, *a):
        super().__init__(*a)
        self.used: dict[str, set[str]] = {}
        self.links = self.copies = 0
        self.stage = os.path.join(self.cfg.out, STAGING)
        os.makedirs(self.stage)
        self.entries: list[str] = []

    def add(self, shard, key, label, members, src_path) -> bool:
        ext, data = pick_image(members)
        if data is None:
            self.stats.skip("no_image", f"{shard}: sample {key!r} has no image member", shard)
            return False
        cdir = self.class_dir(label)
        used = self.used.setdefault(cdir, set())
        name = key.rsplit("/", 1)[-1]
        if name in used or name.startswith("."):
            name = key.replace("/", "_")
        if name in used or name in ("", ".", "..") or name.startswith("."):
            name = f"{key.replace('/', '_').lstrip('.')}-{len(used)}"
        used.add(name)
        d = os.path.join(self.stage, cdir)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{name}.{ext}")
        if src_path is not None:
            try:
                os.link(src_path, path)
                self.links += 1
                return True
            except OSError:
                pass
        with open(path, "wb") as f:
            f.write(data)
        self.copies += 1
        return True

    def close(self) -> None:
        self.entries = sorted(os.listdir(self.stage))
        for e in self.entries:
            src, dst = os.path.join(self.stage, e), os.path.join(self.cfg.out, e)
            if os.path.isdir(src) and os.path.isdir(dst):  # a directory of the user's: merge into it
                for f in sorted(os.listdir(src)):
                    os.replace(os.path.join(src, f), os.path.join(dst, f))
                os.rmdir(src)
            else:
                os.replace(src, dst)
        os.rmdir(self.stage)
        self.files = [{"name": c or ".", "samples": len(u)} for c, u in sorted(self.used.items())]

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    @property
    def label_order_kept(self) -> bool:
        """ImageFolder numbers the class directories in sorted order; True if that gives back our
        labels (names sort in label order and no class is missing from the export)."""
        names = [self.class_dir(i) for i in range(len(self.classes or []))]
        present = {c for c, used in self.used.items() if used}
        return names == sorted(names) and set(names) == present

    def index_fields(self) -> dict[str, Any]:
        return {"hard_links": self.links, "copies": self.copies, "label_order_kept": self.label_order_kept,
                "entries": self.entries}

    @classmethod
    def previous_entries(cls, index: dict[str, Any]) -> list[str]:
        """The class directories / files an earlier folder export moved into place."""
        return [e for e in index.get("entries", []) if isinstance(e, str)]
