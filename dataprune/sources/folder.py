"""Image folders: ``root/<class>/**/*.jpg`` (classes sorted as torchvision's ImageFolder) or a flat
folder of unlabelled images, cut into virtual shards of ``shard_files`` files."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from ..errors import SourceError
from ..ids import sample_id
from .base import IMAGE_EXTS, Fetched, Sample, Shard, Source, unsafe_name

DEFAULT_SHARD_FILES = 10_000


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in name


class FolderSource(Source):
    format = "folder"

    def __init__(self, path: str, shard_files: int = DEFAULT_SHARD_FILES, **options):
        super().__init__(path, shard_files=shard_files, **options)
        self.root = os.path.abspath(path)
        self.shard_files = int(shard_files)
        self._listed = False

    def _walk(self, top: str) -> list[str]:
        out = []
        seen_dirs: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop (or a second link to a directory)
                dirnames[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            dirnames.sort()
            for f in sorted(filenames):
                if _is_image(f):
                    out.append(os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/"))
        return out

    def list_shards(self) -> list[Shard]:
        if not os.path.isdir(self.root):
            raise SourceError(f"{self.path}: not a directory", reason="missing_file", path=self.path)
        with os.scandir(self.root) as it:
            entries = sorted(it, key=lambda e: e.name)
        class_dirs = [e.name for e in entries if e.is_dir()]
        files: list[str] = []
        if class_dirs:
            for c in class_dirs:
                files.extend(self._walk(os.path.join(self.root, c)))
        self._listed = True
        if files:
            self.classes = class_dirs  # ImageFolder indices: every sub-directory, sorted
        else:
            files = [e.name for e in entries if e.is_file() and _is_image(e.name)]
        if not files:
            raise SourceError(f"{self.path}: no images found ({', '.join(IMAGE_EXTS)})", reason="no_shards", path=self.path)
        n = self.shard_files
        return [
            Shard(index=i, name=f"folder-{i:06d}", path=self.root, files=tuple(files[s : s + n]))
            for i, s in enumerate(range(0, len(files), n))
        ]

    def _label(self, rel: str) -> int | None:
        if not self.classes or "/" not in rel:
            return None
        return self.classes.index(rel.split("/", 1)[0]) if rel.split("/", 1)[0] in self.classes else None

    def iter_samples(self, shard: Shard) -> Iterator[Sample]:
        if not self._listed:
            self.list_shards()  # a worker rebuilt from a spec: recover the class list
        seen: set[str] = set()
        for rel in shard.files:
            key, ext = rel.rsplit(".", 1)
            ext = ext.lower()
            full = os.path.join(self.root, rel)
            s = Sample(
                shard=shard.name, key=key, sample_id=sample_id("", key), label=self._label(rel),
                image=None, image_ext=ext, loc_path=full, loc_offset=0, loc_size=0,
            )
            if unsafe_name(rel):
                s.status, s.error = "unsafe_name", f"{full}: unsafe file name"
            elif key in seen:
                s.status, s.error = "duplicate_key", f"{full}: another image has the same name without extension ({key!r})"
            else:
                seen.add(key)
                try:
                    with open(full, "rb") as f:
                        s.image = f.read()
                    s.loc_size = len(s.image)
                    s.members = {ext: s.image}
                    if s.label is not None:
                        s.members["cls"] = str(s.label).encode()
                except OSError as e:
                    s.status, s.error = "unreadable", f"{full}: cannot read ({e.strerror or e})"
            yield s

    def fetch(self, loc_path: str, rows: Iterable[tuple[str, int, int]]) -> Iterator[Fetched]:
        for key, _offset, _size in rows:
            try:
                with open(loc_path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise SourceError(f"{loc_path}: cannot read ({e.strerror or e})", reason="missing_file", path=loc_path) from None
            ext = loc_path.rsplit(".", 1)[-1].lower()
            members = {ext: data}
            rel = os.path.relpath(loc_path, self.root).replace(os.sep, "/")
            if not self._listed:
                self.list_shards()
            label = self._label(rel)
            if label is not None:
                members["cls"] = str(label).encode()
            yield Fetched(key, members)
