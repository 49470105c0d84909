"""Image-folder writer: ``<class>/<name>.<ext>``, as torchvision's ImageFolder reads it.

ImageFolder (and dataprune's folder source) number the classes by their sorted directory names, so
the export makes a directory for every class of the dataset — empty ones included, so that a class
that lost all its samples does not renumber every later one (read them with
``ImageFolder(OUT, allow_empty=True)``) — named so that they sort in label order
(:meth:`~.base.Writer.class_dirs`), and writes ``classes.txt`` (line i = the name of label i).
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

from ..sources.base import pick_image
from .base import CLASSES_FILE, Writer, register_writer

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
        self.labels: set[int] = set()  # labels of the samples written

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
        if label is not None:
            self.labels.add(label)
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
        for cdir in self.class_dirs():  # every class, so that sorted names give back the labels
            os.makedirs(os.path.join(self.stage, cdir), exist_ok=True)
            self.used.setdefault(cdir, set())
        if self.classes:
            self.writing = os.path.join(self.stage, CLASSES_FILE)
            with open(self.writing, "x", encoding="utf-8", newline="\n") as f:
                f.write("".join(c + "\n" for c in self.classes))
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
        self.files = [{"name": c or ".", "samples": len(u)} for c, u in sorted(self.used.items()) if u or c in self.class_dirs()]

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    @property
    def label_order_kept(self) -> bool:
        """ImageFolder numbers the class directories in sorted order; True if that gives back every
        written sample's label (always, for the classes of the dataset; labels without class names
        only when they are 0..n-1 with n ≤ 10, as their plain numbers sort)."""
        dirs = self.class_dirs()
        labels = sorted(self.labels)
        if dirs:
            return all(0 <= x < len(dirs) for x in labels)
        return labels == list(range(len(labels))) and [str(x) for x in labels] == sorted(str(x) for x in labels)

    @property
    def empty_classes(self) -> list[str]:
        return [c for c in self.class_dirs() if not self.used.get(c)]

    def notes(self) -> list[str]:
        out = []
        if self.empty_classes:
            e = self.empty_classes
            out.append(f"{len(e)} class folder(s) are empty ({', '.join(e[:5])}{', ...' if len(e) > 5 else ''}), kept so labels "
                       "stay numbered as in the dataset: read with torchvision's ImageFolder(OUT, allow_empty=True)")
        if not self.label_order_kept:
            out.append("ImageFolder numbers classes by their sorted folder names, which here differ from the samples' labels "
                       "(labels without class names, or beyond them); use the labels in index.json / the manifest")
        return out

    def index_fields(self) -> dict[str, Any]:
        return {"hard_links": self.links, "copies": self.copies, "label_order_kept": self.label_order_kept,
                "class_dirs": self.class_dirs(), "empty_classes": self.empty_classes, "entries": self.entries}
