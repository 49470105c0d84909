"""Selection: score tables (ours or foreign) → the rows to keep → one parquet manifest for `export`.

``order`` holds the pure functions over numpy columns (budget, quotas, top-k per group, mean rank);
``strategies`` the registry of strategies (hard, easy, random, ccs) and ``plan_selection``, which
combines them into one decision; ``inputs`` and ``gather`` read only the columns the decision needs
and join the inputs (``foreign``: directions and file-name keys of other tools' score files, the
paper's released ImageNet-1K scores); ``run`` drives it all and streams the kept rows into the
manifest. Above the memory limit ``stream`` takes the same decision out of core, in passes over the
table (``radix``: exact ranks by histograms), and writes the same manifest.

Order and ties. Every metric column means *higher = harder*. Rows are ordered by
``(score, mix64(sample_id, seed))``: ``hard`` keeps the top of that order, ``easy`` the bottom,
``--drop-hardest``/``--ccs-beta`` remove the top, ``random`` keeps the smallest ``mix64`` values and
CCS samples inside each stratum the same way. So a selection depends only on
``(sample_id, score, seed)`` — never on row order, file order or the number of processes.
"""

from __future__ import annotations

from ..config import SelectConfig
from .inputs import Input, open_input
from .order import budget, class_quotas, largest_remainder, mean_rank, order_key, random_key, top_k_per_group
from .run import run_select
from .strategies import (STRATEGIES, Pool, Selection, Strategy, ccs_allocate, ccs_strata, check, check_keeps, config_for,
                         get_strategy, list_strategies, plan_selection, register, unregister, validate)

__all__ = ["SelectConfig", "Selection", "budget", "largest_remainder", "class_quotas", "order_key", "top_k_per_group",
           "random_key", "mean_rank", "ccs_strata", "ccs_allocate", "plan_selection", "open_input", "run_select",
           "Input", "Pool", "Strategy", "register", "list_strategies", "get_strategy", "check", "check_keeps",
           "config_for", "unregister", "validate", "STRATEGIES"]
