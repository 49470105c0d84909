"""Image-folder writer: ``<class>/<name>.<ext>``, as torchvision's ImageFolder reads it."""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

from ..sources.base import pick_image
from .base import Writer, register_writer

STAGING = ".dataprune-folder.tmp"  # folder exports are built here, then moved into place


@register_writer("folder")
class FolderWriter(Writer):
    """``<class>/<name>.<ext>`` (unlabelled samples at the top): hard links to the source files when
    possible, else copies (never a symlink). Built in a hidden staging directory, moved into place by
    :meth:`close`; its ``index.json`` lists the top-level names it made (``entries``)."""

    outputs = (r"[^.].*",)  # class directories and unlabelled images: any name not starting with a dot

    def __init__(self, *a):
        super().__init__(*a)
        self.used: dict[str, set[str]] = {}
        self.links = self.copies = 0
        self.stage = os.path.join(self.cfg.out, STAGING)
        os.makedirs(self.stage)
        self.entries: list[str] = []
        self.taken: set[str] = set()  # relative paths written

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
        rel = f"{cdir}/{name}.{ext}" if cdir else f"{name}.{ext}"
        n = len(used)
        while rel in self.taken:  # e.g. keys "a" + ext "x.jpg" and "a.x" + "jpg"
            n += 1
            rel = f"{cdir}/{name}-{n}.{ext}" if cdir else f"{name}-{n}.{ext}"
        if self.refuse_unsafe(shard, key, rel):
            return False
        used.add(name)
        self.taken.add(rel)
        d = os.path.join(self.stage, cdir)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(self.stage, rel)
        self.writing = path
        if src_path is not None and self._link(src_path, path, len(data)):
            self.links += 1
            return True
        with open(path, "xb") as f:
            f.write(data)
        self.copies += 1
        return True

    @staticmethod
    def _link(src: str, dst: str, size: int) -> bool:
        """Hard-link ``dst`` to ``src`` when that gives a regular file of the sample's size (never a
        link to a symlink, a FIFO or a device; a file that changed since it was read is copied)."""
        try:
            os.link(src, dst)
        except OSError:
            return False
        st = os.lstat(dst)
        if stat.S_ISREG(st.st_mode) and st.st_size == size:
            return True
        os.unlink(dst)
        return False

    def close(self) -> None:
        self.entries = sorted(os.listdir(self.stage))
        for e in self.entries:
            src, dst = os.path.join(self.stage, e), os.path.join(self.cfg.out, e)
            if os.path.isdir(src) and os.path.isdir(dst) and not os.path.islink(dst):  # a directory of the user's: merge into it
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
