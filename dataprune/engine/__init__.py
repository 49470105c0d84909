"""The scoring engine: plan a run, stream the data through the model, write the score table.

``plan`` (resolve defaults, validate, open the source) → ``batches`` (the streaming tools every pass
shares) → ``training`` (proxy models, training dynamics) and ``embedding`` (encoder features and the
global embedding metrics) → ``score`` (the loop). Each module imports only the ones before it.
"""

from ..config import ScoreConfig
from .planning import DEFAULT_ENCODER, DEFAULT_EPOCHS, DEFAULT_MODEL, Plan, auto_workers, plan, resolve_defaults
from .scoring import score

__all__ = ["DEFAULT_ENCODER", "DEFAULT_EPOCHS", "DEFAULT_MODEL", "Plan", "ScoreConfig", "auto_workers", "plan", "resolve_defaults",
           "score"]
