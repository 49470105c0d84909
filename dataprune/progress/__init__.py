"""Progress reporting: ``score_reporter`` (one overall bar with an ETA over a whole score or curve
job, and its current phase; timestamped lines off a terminal) and ``progress_bar`` (one count)."""

from .bars import progress_bar
from .reporter import score_reporter

__all__ = ["progress_bar", "score_reporter"]
