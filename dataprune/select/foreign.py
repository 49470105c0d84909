"""Foreign score files: which way their scores point, file-name keys, and the scores Sorscher et al.
(2022) released for ImageNet-1K (github.com/rgeirhos/dataset-pruning-metrics, ``metric-scores/
ImageNet-1K_<metric>.csv``).

A foreign file says nothing about its direction, so each input carries one: ``--direction
higher-is-harder|higher-is-easier`` for every file, or ``file.csv:harder`` / ``file.csv:easier`` for
one. A higher-is-easier score is negated as it is read (exact, and ties stay ties), so every column
dataprune selects by means higher = harder. The released files are all "higher = better to keep"
(their README; the prototype scores were reversed to fit), which for every metric there means
harder — far from the prototype, often forgotten, high EL2N —, so they are read as they are.

File names are matched by their *stem*: the base name without an image extension, so
``n01440764_10026.JPEG``, ``train/n01440764/n01440764_10026.JPEG`` and the folder or tar key
``n01440764/n01440764_10026`` are one sample (ImageNet's file names are unique without their
synset directory).

The layout of the released CSVs is assumed, not seen (they could not be downloaded here): a header
row, then per image ``[an integer index,] its file name, its score`` — the shape that pandas'
``to_csv`` writes and that published loaders of these files read (``row[1]`` the name, ``row[2]`` the
score). ``released`` checks that shape and the row count and says what it expected.
"""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError

IMAGENET_TRAIN_ROWS = 1_281_167
RELEASED_NAME = re.compile(r"ImageNet-1K_(?P<metric>.+)\.csv", re.IGNORECASE)
NAME_COLUMNS = ("filename", "file_name", "file", "path", "image", "image_name", "name")  # file-name keys (matched by stem)
SUFFIXES = {"harder": "higher-is-harder", "easier": "higher-is-easier",
            "higher-is-harder": "higher-is-harder", "higher-is-easier": "higher-is-easier"}
IMAGENET_NAME = r"^(?:.*/)?n[0-9]{8}_[0-9]+(?:\.(?i:jpe?g))?$"
_EXT = r"\.(?i:jpe?g|png|webp|bmp|gif|tiff?)$"


def split_direction(arg: str, default: str) -> tuple[str, str]:
    """``file.csv:easier`` → (``file.csv``, ``higher-is-easier``); a path without a suffix (or one
    that exists as written) keeps ``default``."""
    if os.path.exists(arg) or ":" not in os.path.basename(arg):
        return arg, default
    path, suffix = arg.rsplit(":", 1)
    if suffix not in SUFFIXES:
        raise ConfigError(f"{arg}: unknown direction suffix {suffix!r}; use {path}:harder or {path}:easier")
    if os.path.isdir(path):  # ignoring it would select the other end than asked
        raise ConfigError(f"{arg}: a score table records its metrics' direction (higher = harder); :{suffix} is for "
                          "foreign score files. For the easy end pass the table alone with --keep easy")
    return path, SUFFIXES[suffix]


def stems(names: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """File names or keys → their stems: the base name without an image extension."""
    s = pc.cast(names, pa.string())
    return pc.replace_substring_regex(pc.replace_substring_regex(s, r"^.*/", ""), _EXT, "")


def metric_name(path: str) -> str | None:
    """``ImageNet-1K_EL2N-20-models.csv`` → ``el2n_20_models``; None for other names."""
    m = RELEASED_NAME.fullmatch(os.path.basename(path))
    return re.sub(r"[^0-9a-z]+", "_", m.group("metric").lower()).strip("_") if m else None


def expected_rows(path: str, expect_rows: int | None) -> int | None:
    """Rows a foreign file must have: ``--expect-rows`` (0: any), else ImageNet-1K train's for the
    released files, else any."""
    if expect_rows is not None:
        return expect_rows or None
    return IMAGENET_TRAIN_ROWS if metric_name(path) else None


def check_rows(path: str, n: int, expect_rows: int | None) -> None:
    want = expected_rows(path, expect_rows)
    if want is not None and n != want:
        what = "ImageNet-1K's training set" if want == IMAGENET_TRAIN_ROWS and expect_rows is None else "--expect-rows"
        raise ConfigError(f"{path}: {n:,} score rows, expected {want:,} ({what}); pass --expect-rows N for another "
                          "size, or --expect-rows 0 to accept any")


def released(path: str, t: pa.Table, expect_rows: int | None) -> pa.Table:
    """A released ``ImageNet-1K_<metric>.csv`` as a table of ``name`` (the stem) and the metric, or a
    ConfigError naming what was expected and what was found."""
    metric = metric_name(path) or "score"
    expect = ("a header row, then [an integer index,] an ImageNet file name (n01440764_10026.JPEG) and one score "
              "per image (the layout of rgeirhos/dataset-pruning-metrics)")
    names = t.column_names
    if any(re.match(IMAGENET_NAME, str(c)) for c in names):
        raise ConfigError(f"{path}: expected {expect}; found no header row (the first line, {', '.join(names)}, is an "
                          "image's row)")
    if len(names) not in (2, 3):
        raise ConfigError(f"{path}: expected {expect}; found {len(names)} columns ({', '.join(map(repr, names))})")
    if len(names) == 3 and not pa.types.is_integer(t.schema.field(0).type):
        raise ConfigError(f"{path}: expected {expect}; the first of 3 columns, {names[0]!r}, is "
                          f"{t.schema.field(0).type}, not an integer index")
    name_col, score_col = t.column(len(names) - 2), t.column(len(names) - 1)
    if not (pa.types.is_string(name_col.type) or pa.types.is_large_string(name_col.type)):
        raise ConfigError(f"{path}: expected {expect}; column {names[-2]!r} is {name_col.type}, not file names")
    if not (pa.types.is_integer(score_col.type) or pa.types.is_floating(score_col.type) or pa.types.is_null(score_col.type)):
        raise ConfigError(f"{path}: expected {expect}; column {names[-1]!r} is {score_col.type}, not numbers")
    ok = pc.fill_null(pc.match_substring_regex(name_col, IMAGENET_NAME), False)
    bad = len(ok) - pc.sum(ok).as_py() if len(ok) else 0
    if bad:
        first = pc.index(ok, False).as_py()
        raise ConfigError(f"{path}: line {first + 2}: {name_col[first].as_py()!r} is not an ImageNet training file name; "
                          f"expected names like n01440764_10026.JPEG ({bad:,} rows are not)")
    check_rows(path, t.num_rows, expect_rows)
    return pa.table({"name": stems(name_col), metric: pc.cast(score_col, pa.float64())})


def reverse(t: pa.Table, metrics: list[str]) -> pa.Table:
    """Negate the metric columns of a higher-is-easier file (integers become float64: no overflow)."""
    for m in metrics:
        i = t.column_names.index(m)
        col = t.column(i)
        if not pa.types.is_floating(col.type):
            col = pc.cast(col, pa.float64())
        t = t.set_column(i, m, pc.negate(col))
    return t
