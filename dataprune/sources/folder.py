"""Image folders: ``root/<class>/**/*.jpg`` (classes sorted as torchvision's ImageFolder) or a flat
folder of unlabelled images, cut into virtual shards of ``shard_files`` files.

A folder is untrusted input: only regular files are read (FIFOs, sockets, devices and symlinks to
them are counted as ``not_regular_file``, never opened), a symlink is followed only when its target
lies inside the root (else ``outside_root``), a directory that cannot be listed is counted
(``unreadable_dir``), and a name that is not valid UTF-8 is counted (``unsafe_name``). Problems found
while listing travel with the first shard (``Shard.problems``) so that every driver counts them."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from ..errors import ConfigError, SourceError
from ..ids import sample_id
from .base import IMAGE_EXTS, Fetched, Sample, Shard, Source
from .guard import Refused, check_row, escape_name, is_inside, read_classes, read_regular, shown, unsafe_name, valid_utf8

DEFAULT_SHARD_FILES = 10_000


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in name


class FolderSource(Source):
    format = "folder"
    checks_locations = True

    def __init__(self, path: str, shard_files: int = DEFAULT_SHARD_FILES, **options):
        if isinstance(shard_files, bool) or not isinstance(shard_files, int) or shard_files < 1:
            raise ConfigError(f"--shard-files must be a positive integer, not {shard_files!r}")
        super().__init__(path, shard_files=shard_files, **options)
        self.root = os.path.abspath(path)
        self.real_root = os.path.realpath(self.root)
        self.shard_files = shard_files
        self._dirs: list[str] | None = None  # the root's sub-directories as on disk (labels index them)

    def input_dirs(self, loc_paths) -> set[str]:
        return {self.root}

    def location_roots(self) -> list[tuple[str, bool]]:
        return [(self.root, True)]

    def contains(self, path: str) -> bool:
        """Inside the root, and an image's name: nothing else is ever a sample of a folder."""
        return isinstance(path, str) and _is_image(path) and super().contains(path)

    def _class_dirs(self) -> list[str]:
        """ImageFolder's classes: every sub-directory of the root, sorted (one listing, no walk)."""
        if self._dirs is None:
            try:
                with os.scandir(self.root) as it:
                    self._dirs = sorted(e.name for e in it if _is_dir(e))
            except OSError:
                self._dirs = []
        return self._dirs

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def _walk(self, top: str, problems: list) -> list[str]:
        out = []
        seen_dirs: set[tuple[int, int]] = set()

        def unreadable(e: OSError) -> None:  # os.walk drops these unless asked
            where = e.filename if isinstance(e.filename, str) else top
            problems.append((escape_name(self._rel(where)), "unreadable_dir",
                             f"{shown(where)}: directory cannot be listed ({e.strerror or e}); the images in it are not counted"))

        for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=unreadable):
            try:
                st = os.stat(dirpath)
            except OSError as e:
                unreadable(e)
                dirnames[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop (or a second link to a directory)
                dirnames[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            keep = []
            for d in sorted(dirnames):
                full = os.path.join(dirpath, d)
                if os.path.islink(full) and not is_inside(os.path.realpath(full), self.real_root):
                    problems.append((escape_name(self._rel(full)), "outside_root",
                                     f"{shown(full)}: a symbolic link to a directory outside the dataset "
                                     f"({shown(os.path.realpath(full))}); not followed"))
                    continue
                keep.append(d)
            dirnames[:] = keep
            for f in sorted(filenames):
                if _is_image(f):
                    out.append(self._rel(os.path.join(dirpath, f)))
        return out

    def list_shards(self) -> list[Shard]:
        if not valid_utf8(self.root):
            raise SourceError(f"{shown(self.root)}: the path is not valid UTF-8; rename it", reason="unsafe_name", path=self.path)
        if not os.path.isdir(self.root):
            raise SourceError(f"{self.path}: not a directory", reason="missing_file", path=self.path)
        try:
            with os.scandir(self.root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise SourceError(f"{self.path}: cannot list the directory ({e.strerror or e})", reason="unreadable", path=self.path) from None
        class_dirs = [e.name for e in entries if _is_dir(e)]
        self._dirs = class_dirs
        files: list[str] = []
        problems: list[tuple[str, str, str]] = []
        for c in class_dirs:
            top = os.path.join(self.root, c)
            if os.path.islink(top) and not is_inside(os.path.realpath(top), self.real_root):
                problems.append((escape_name(c), "outside_root", f"{shown(top)}: a symbolic link to a directory outside the "
                                 f"dataset ({shown(os.path.realpath(top))}); not followed"))
                continue
            files.extend(self._walk(top, problems))
        if files:  # ImageFolder indices: every sub-directory, sorted
            self.classes = _class_names(self.root, class_dirs)
        else:  # a flat folder; FIFOs, devices and broken links with image names are listed to be counted
            files = [e.name for e in entries if not _is_dir(e) and _is_image(e.name)]
        if not files:
            why = f"; {len(problems)} problem(s) while listing, e.g. {problems[0][2]}" if problems else ""
            raise SourceError(f"{self.path}: no images found ({', '.join(IMAGE_EXTS)}){why}", reason="no_shards", path=self.path)
        n = self.shard_files
        return [
            Shard(index=i, name=f"folder-{i:06d}", path=self.root, files=tuple(files[s : s + n]),
                  problems=tuple(problems) if i == 0 else ())
            for i, s in enumerate(range(0, len(files), n))
        ]

    def _label(self, rel: str) -> int | None:
        """A file below a class directory has its index (a flat folder's files have no "/")."""
        if "/" not in rel:
            return None
        dirs = self._class_dirs()
        if getattr(self, "_index", (None,))[0] is not dirs:  # label per directory name, built once per listing
            self._index = (dirs, {d: i for i, d in enumerate(dirs)})
        return self._index[1].get(rel.split("/", 1)[0])

    def iter_samples(self, shard: Shard) -> Iterator[Sample]:
        for rel, reason, message in shard.problems:  # counted like samples: seen = kept + skipped
            key = rel + "/"  # a directory: never an image's key
            yield Sample(shard=shard.name, key=key, sample_id=sample_id("", key), label=None, image=None, image_ext=None,
                         loc_path=os.path.join(self.root, rel), loc_offset=0, loc_size=0, status=reason, error=message)
        seen: set[str] = set()
        for rel in shard.files:
            key, ext = rel.rsplit(".", 1)
            ext = ext.lower()
            full = os.path.join(self.root, rel)
            good_name = valid_utf8(rel)
            if not good_name:
                key, full = escape_name(key), escape_name(full)
            s = Sample(
                shard=shard.name, key=key, sample_id=sample_id("", key), label=self._label(rel),
                image=None, image_ext=ext, loc_path=full, loc_offset=0, loc_size=0,
            )
            if not good_name:
                s.status, s.error = "unsafe_name", f"{shown(full)}: the file name is not valid UTF-8; rename it"
            elif unsafe_name(rel):
                s.status, s.error = "unsafe_name", f"{shown(full)}: unsafe file name"
            elif key in seen:
                s.status, s.error = "duplicate_key", f"{shown(full)}: another image has the same name without extension ({key!r})"
            else:
                seen.add(key)
                try:
                    s.image, _ = read_regular(full, self.real_root)
                except Refused as e:
                    s.status = "unreadable" if e.reason == "missing_file" else e.reason
                    s.error = f"{shown(full)}: {e.detail}" if e.reason != "missing_file" else f"{full}: cannot read ({e.detail})"
                else:
                    s.loc_size = len(s.image)
                    s.members = {ext: s.image}
                    if s.label is not None:
                        s.members["cls"] = str(s.label).encode()
            yield s

    def fetch(self, loc_path: str, rows: Iterable[tuple[str, int, int]]) -> Iterator[Fetched]:
        """Each row is one whole file: a regular file inside the root, of the row's size."""
        for key, offset, size in rows:
            check_row(loc_path, key, offset, size)  # (inside the root: read_regular checks the opened file's real path)
            if not _is_image(loc_path):
                raise SourceError(f"{shown(loc_path)}: sample {key!r}: not an image file ({', '.join(IMAGE_EXTS)}), so not "
                                  "part of an image folder; refused", reason="outside_root", path=loc_path)
            if offset != 0:
                raise SourceError(f"{shown(loc_path)}: sample {key!r}: loc_offset {offset} (an image file is read whole, "
                                  "from offset 0)", reason="bad_location", path=loc_path)
            try:
                data, real = read_regular(loc_path, self.real_root, size=size)
            except Refused as e:
                raise SourceError(f"{shown(loc_path)}: sample {key!r}: {e.detail}", reason=e.reason, path=loc_path) from None
            ext = loc_path.rsplit(".", 1)[-1].lower()
            members = {ext: data}
            rel = self._rel(os.path.abspath(loc_path))
            if rel.startswith("../"):  # given through the root's real path
                rel = os.path.relpath(os.path.abspath(loc_path), self.real_root).replace(os.sep, "/")
            label = self._label(rel)
            if label is not None:
                members["cls"] = str(label).encode()
            yield Fetched(key, members, path=real)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks, as ImageFolder does
    except OSError:
        return False


def _class_names(root: str, class_dirs: list[str]) -> list[str]:
    """Class names: the directory names, or — when the root holds a ``classes.txt`` that describes
    exactly these directories, as a dataprune folder export writes it — its names. A line describes
    directory i when the directory is that name or the export's label-prefixed form (``003_cat``,
    ``003`` for a blank name), so a stray classes.txt of other meaning is never applied."""
    import re

    names = read_classes(os.path.join(root, "classes.txt"))
    if names and len(names) == len(class_dirs) and all(
            d == n or re.fullmatch(rf"{i:03d}(_.+)?", d) for i, (d, n) in enumerate(zip(class_dirs, names))):
        return [escape_name(n) for n in names]
    return [escape_name(c) for c in class_dirs]
