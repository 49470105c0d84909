"""`dataprune report`: one self-contained HTML page (plus its plots and thumbnails) that shows what a
score table says — distributions, the hardest and easiest images of each class, label-noise suspects,
duplicates, a selection's effect and the pruning curve. Opened from disk: no server, nothing fetched
from outside its folder."""

from .build import INDEX, build_report

__all__ = ["INDEX", "build_report"]
