"""Selection strategies: a registry that holds, for each name, the callable choosing the rows.

``plan_selection`` does what every strategy shares — the budget, the class groups and their quotas,
and taking out the hardest fraction first (``--drop-hardest``, or ``--ccs-beta`` for CCS) — and then
hands the remaining rows to the strategy named by ``SelectConfig.keep_mode``. A strategy is one
function ``choose(pool: Pool) -> (mask over pool rows, strata plan or None)`` registered with
``@register(name)``; it must keep exactly ``pool.quotas[g]`` rows of every group ``g``, and depend
only on ``(sample_id, score, seed)``. The names are the one ``--keep`` vocabulary: ``curve --keep``
takes every registered name; ``select`` reaches ``ccs`` through ``--strategy ccs`` (``flag``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from fractions import Fraction
from typing import Any, Callable, Iterable

import numpy as np

from ..config import SelectConfig, default
from ..errors import ConfigError
from ..registry import Registry
from .order import _counts, budget, class_quotas, order_key, random_key, top_k_per_group
from .tally import DENSE, class_stats

Choice = tuple[np.ndarray, "list[dict[str, Any]] | None"]  # kept rows of the pool, per-stratum plan (CCS)


class Pool:
    """The rows a strategy chooses among (what ``--drop-hardest``/``--ccs-beta`` left) and how many to
    keep of each group: ``cfg``, ``ids`` (uint64), ``codes`` (each row's group in 0..groups-1; None =
    one group), ``groups``, ``quotas`` (int64 per group, each at most the group's rows here), and on
    first use ``score`` (higher = harder, NaN-free; None without a score) and ``key`` (its
    ``order_key``)."""

    def __init__(self, cfg: SelectConfig, ids: np.ndarray, score: np.ndarray | None, codes: np.ndarray | None,
                 groups: int, quotas: np.ndarray, *, rows: np.ndarray | None = None, key: np.ndarray | None = None):
        self._rows, self._score, self._key = rows, score, key  # rows: the pool's rows among the candidates (None: all)
        self.cfg, self.ids, self.codes = cfg, self._sub(ids), self._sub(codes)
        self.groups, self.quotas = groups, quotas

    def _sub(self, a: np.ndarray | None) -> np.ndarray | None:
        return a if a is None or self._rows is None else a[self._rows]

    @cached_property
    def score(self) -> np.ndarray | None:
        return self._sub(self._score)

    @cached_property
    def key(self) -> np.ndarray:
        if self._key is not None:
            return self._sub(self._key)
        if self.score is None:
            raise ConfigError("this selection strategy needs a score")
        return order_key(self.score)


@dataclass(frozen=True)
class Strategy:
    name: str
    choose: Callable[[Pool], Choice]  # the rows kept of the pool (bool mask), and a per-stratum plan or None
    needs_score: bool = True
    beta: str = "drop_hardest"  # the SelectConfig field whose fraction of the hardest rows is taken out first
    flag: str = "keep"  # how `select` names it: --keep NAME, or --strategy NAME


STRATEGIES: Registry[Strategy] = Registry("selection strategy", lambda name, names: f"unknown selection strategy {name!r}; "
                                           f"registered: {', '.join(names)}")


Chooser = Callable[[Pool], Choice]


def register(name: str, *, needs_score: bool = True, beta: str = "drop_hardest",
             flag: str = "keep") -> Callable[[Chooser], Chooser]:
    """Decorator: ``@register("mine")`` over ``def choose(pool: Pool) -> Choice``. ``needs_score``:
    refuse to run without ``--by``; ``beta``: the option taking out the hardest rows first;
    ``flag``: ``select --keep NAME`` (default) or ``select --strategy NAME``."""
    def deco(fn: Chooser) -> Chooser:
        STRATEGIES.add(name, Strategy(name, fn, needs_score, beta, flag))
        return fn
    return deco


def list_strategies() -> list[str]:
    """Every registered name, in registration order (hard, easy, random, ccs, then any added)."""
    return list(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    return STRATEGIES.lookup(name)


def unregister(name: str) -> None:
    """Take a strategy out again (tests that register a toy one)."""
    STRATEGIES.remove(name)


def _named(flag: str) -> list[str]:
    return [n for n, s in STRATEGIES.items() if s.flag == flag]


def check(cfg: SelectConfig) -> None:
    """The ``--strategy``/``--keep`` names and their combinations with the other options (the number
    checks are ``cfg.validate()``)."""
    strategies, keeps = ["plain"] + _named("strategy"), _named("keep")
    if cfg.strategy not in strategies:
        raise ConfigError(f"--strategy must be one of {', '.join(strategies)}, not {cfg.strategy!r}")
    if cfg.keep is not None and cfg.keep not in keeps:
        raise ConfigError(f"--keep must be one of {', '.join(keeps)}, not {cfg.keep!r}")
    if cfg.strategy == "ccs" and cfg.keep is not None:
        raise ConfigError("--strategy ccs samples across score strata; leave out --keep")
    if cfg.strategy == "ccs" and cfg.drop_hardest:
        raise ConfigError("--strategy ccs drops the hardest rows with --ccs-beta; leave out --drop-hardest")
    if cfg.strategy != "ccs" and (cfg.ccs_beta or cfg.ccs_strata != default(SelectConfig, "ccs_strata")):
        raise ConfigError("--ccs-beta and --ccs-strata need --strategy ccs")


def validate(cfg: SelectConfig) -> None:
    """Every check of a select config, in the order the user meets them: ``--frac``/``--count`` (the
    number checks of a config that sets only those), the names (``check``), then the other numbers."""
    SelectConfig(frac=cfg.frac, count=cfg.count).validate()
    check(cfg)
    cfg.validate()


def needs_score(cfg: SelectConfig) -> bool:
    """Whether the selection reads a score: its strategy needs one, it takes out the hardest rows
    first, or it filters or orders by one."""
    s = get_strategy(cfg.keep_mode)
    return (s.needs_score or getattr(cfg, s.beta) > 0 or cfg.min_score is not None or cfg.max_score is not None
            or bool(cfg.by))


def check_keeps(names: Iterable[str]) -> None:
    """``curve --keep a,b``: every name must be a registered strategy."""
    names = list(names)
    bad = [k for k in names if k not in STRATEGIES]
    if bad or not names:
        raise ConfigError(f"--keep takes {', '.join(STRATEGIES)} (comma-separated), not {', '.join(bad) or 'nothing'}")


def config_for(name: str, **options: Any) -> SelectConfig:
    """The SelectConfig that runs registered strategy ``name`` (``--keep name`` or ``--strategy name``)."""
    s = get_strategy(name)
    return SelectConfig(keep=None if s.flag == "strategy" else name,
                        strategy=name if s.flag == "strategy" else "plain", **options)


# ------------------------------------------------------------------------------------ the decision


@dataclass
class Selection:
    """What `plan_selection` decided: a mask over the candidate rows plus the plan shown to users."""

    keep: np.ndarray
    budget: int
    dropped_hardest: int = 0
    per_class: dict[str, list] | None = None  # label, candidates, kept, kept_min, kept_max (when labelled)
    strata: list[dict[str, Any]] | None = None


def _group_codes(labels: np.ndarray | None) -> tuple[np.ndarray | None, list]:
    """Dense-enough group codes for labels (int with -1 … for missing): (codes, label per code)."""
    if labels is None:
        return None, [None]
    lab = np.asarray(labels)
    valid = lab >= 0
    if len(lab) == 0:
        return np.zeros(0, dtype=np.int32), []
    hi = int(lab.max())
    if hi < DENSE:  # labels are class numbers: use them directly; missing → one more group
        has_missing = not bool(valid.all())
        codes = np.where(valid, lab, hi + 1).astype(np.int32) if has_missing else lab.astype(np.int32, copy=False)
        names: list = list(range(hi + 1)) + ([None] if has_missing else [])
        return codes, names
    u, inv = np.unique(lab, return_inverse=True)
    return inv.reshape(-1).astype(np.int32), [int(x) if x >= 0 else None for x in u]


def plan_quotas(cfg: SelectConfig, n: int, sizes: np.ndarray, has_score: bool) -> tuple[int, np.ndarray | None, np.ndarray]:
    """What every strategy shares, from the candidates' count ``n`` and group sizes: the budget,
    the rows each group first drops as its hardest (None when the strategy's beta is 0) and the
    quota each group keeps. Raises ConfigError when the request cannot be met."""
    strategy = get_strategy(cfg.keep_mode)
    k = budget(n, cfg.frac, cfg.count)
    if cfg.count is not None and k > n:
        raise ConfigError(f"--count {k} is more than the {n} selectable rows")
    if k == 0:
        raise ConfigError(f"--frac {cfg.frac} of {n} selectable rows rounds to 0 rows")
    beta = getattr(cfg, strategy.beta)
    what = "--" + strategy.beta.replace("_", "-")
    if not has_score and (strategy.needs_score or beta > 0):
        raise ConfigError(f"--keep {strategy.name} needs a score" if strategy.needs_score
                          else f"{what} needs a score (--by)")
    ndrop = None
    eligible = sizes
    if beta > 0:
        ndrop = np.array([int(Fraction(repr(float(beta))) * int(s)) for s in sizes], dtype=np.int64)  # floor(beta * n_g)
        eligible = sizes - ndrop
    if k > eligible.sum():
        dropped = int(ndrop.sum()) if ndrop is not None else 0
        raise ConfigError(f"cannot keep {k} rows: only {int(eligible.sum())} of {n} remain after {what} {beta} "
                          f"drops the hardest {dropped}")
    if cfg.class_balanced:
        quotas = class_quotas(k, sizes, cfg.class_quota, caps=eligible)
    else:
        quotas = np.array([k], dtype=np.int64)
    return k, ndrop, quotas


def plan_selection(cfg: SelectConfig, ids: np.ndarray, score: np.ndarray | None, labels: np.ndarray | None) -> Selection:
    """Choose rows among the candidates. ``ids`` uint64, ``score`` float (higher = harder, NaN-free)
    or None for a pure random choice, ``labels`` int (-1 = missing) or None. Raises ConfigError when
    the request cannot be met."""
    check(cfg)
    strategy = get_strategy(cfg.keep_mode)
    n = len(ids)
    lab_codes, lab_names = _group_codes(labels)
    codes, names = (lab_codes, lab_names) if cfg.class_balanced else (None, [None])
    groups = len(names)
    sizes = _counts(codes, groups, n)
    k, ndrop, quotas = plan_quotas(cfg, n, sizes, score is not None)
    key = order_key(score) if ndrop is not None else None
    avail = np.ones(n, dtype=bool)
    dropped = 0
    if ndrop is not None and ndrop.sum():
        avail = ~top_k_per_group(key, ndrop, ids, cfg.seed, codes=codes, largest=True)
        dropped = int(ndrop.sum())
    idx = None if avail.all() else np.flatnonzero(avail)
    pool = Pool(cfg, ids, score, codes, groups, quotas, rows=idx, key=key)
    chosen, strata = strategy.choose(pool)
    if idx is None:
        keep = chosen
    else:
        keep = np.zeros(n, dtype=bool)
        keep[idx[chosen]] = True
    per_class = _class_stats(lab_codes, lab_names, keep, score) if labels is not None else None
    return Selection(keep=keep, budget=k, dropped_hardest=dropped, per_class=per_class, strata=strata)


def _class_stats(codes: np.ndarray, names: list, keep: np.ndarray, score: np.ndarray | None) -> dict[str, list]:
    """Per class (in label order; unlabelled last as None): candidates, kept and the kept score range."""
    g = len(names)
    cand = _counts(codes, g)
    kc = codes[keep]
    kept = _counts(kc, g)
    lo = hi = None
    if score is not None:
        ks = score[keep]
        lo = np.full(g, np.inf, dtype=ks.dtype)
        hi = np.full(g, -np.inf, dtype=ks.dtype)
        np.minimum.at(lo, kc, ks)
        np.maximum.at(hi, kc, ks)
    return class_stats(names, cand, kept, lo, hi)


# ---------------------------------------------------------------------------------- the strategies


def _top(largest: bool) -> Chooser:
    def choose(p: Pool) -> Choice:
        return top_k_per_group(p.key, p.quotas, p.ids, p.cfg.seed, codes=p.codes, largest=largest), None
    return choose


register("hard")(_top(True))  # the highest scores
register("easy")(_top(False))  # the lowest scores


@register("random", needs_score=False)
def _random(p: Pool) -> Choice:
    """A seeded uniform sample: the smallest ``mix64(sample_id, seed)`` of each group."""
    return top_k_per_group(random_key(p.ids, p.cfg.seed), p.quotas, p.ids, p.cfg.seed, codes=p.codes, largest=False), None


@register("ccs", beta="ccs_beta", flag="strategy")
def _ccs(p: Pool) -> Choice:
    """Coverage-centric coreset selection (Zheng et al., ICLR 2023): equal-width score strata per
    group, the budget split by ``ccs_allocate``, a seeded uniform sample inside each stratum."""
    k = p.cfg.ccs_strata
    strat, lo, step = ccs_strata(p.score, p.codes, p.groups, k)
    cell = strat if p.codes is None else p.codes.astype(np.intp) * k + strat
    sizes = np.bincount(cell, minlength=p.groups * k).reshape(p.groups, k)
    alloc = ccs_allocate(p.quotas, sizes)
    chosen = top_k_per_group(random_key(p.ids, p.cfg.seed), alloc.reshape(-1), p.ids, p.cfg.seed, codes=cell,
                             largest=False)
    return chosen, ccs_plan(sizes, alloc, lo, step)


def ccs_plan(sizes: np.ndarray, alloc: np.ndarray, lo: np.ndarray, step: np.ndarray) -> list[dict[str, Any]]:
    """The per-stratum plan users see: rows and kept per stratum (summed over groups), and the
    stratum's score edges when there is one group."""
    k = sizes.shape[1]
    tot_sizes, tot_alloc = sizes.sum(axis=0), alloc.sum(axis=0)
    one = sizes.shape[0] == 1
    plan = []
    for i in range(k):
        row = {"stratum": i, "rows": int(tot_sizes[i]), "kept": int(tot_alloc[i]),
               "fraction": round(float(tot_alloc[i]) / tot_sizes[i], 4) if tot_sizes[i] else None}
        if one and np.isfinite(lo[0]):
            row["lo"], row["hi"] = float(lo[0] + i * step[0]), float(lo[0] + (i + 1) * step[0])
        plan.append(row)
    return plan


def ccs_strata(score: np.ndarray, codes: np.ndarray | None, groups: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each group's score range into ``k`` equal-width strata: row → stratum in [0, k).

    Edges are ``lo + i * step`` with ``step = (hi - lo) / k``; stratum ``i`` is ``[edge_i, edge_i+1)``
    and the last one also holds ``hi``. A group whose scores are all equal is one stratum (the last).
    Returns strata, lo, step.

    This is *not* bit-for-bit the released CCS code, which uses ``step = (1.0001 * hi - lo) / k`` so
    that ``hi`` falls inside the last stratum: that stretch moves interior edge ``i`` by
    ``0.0001 * hi * i / k``, so on continuous scores a row near an edge can land one stratum lower
    than here, and for a negative ``hi`` (AUM, say) it shrinks the range and leaves the top row out.
    We keep exact equal-width edges over ``[lo, hi]`` and close the last stratum instead: the same
    strata on the paper's definition, independent of the score's sign and scale.
    """
    s = np.asarray(score, dtype=np.float64)
    c = codes if codes is not None else np.zeros(len(s), dtype=np.intp)
    lo = np.full(groups, np.inf)
    hi = np.full(groups, -np.inf)
    np.minimum.at(lo, c, s)
    np.maximum.at(hi, c, s)
    step = ccs_step(lo, hi, k)
    return ccs_assign(s, c, lo, step, k), lo, step


def ccs_step(lo: np.ndarray, hi: np.ndarray, k: int) -> np.ndarray:
    """Each group's stratum width from its score range (0 for a group of equal scores or none); an
    infinite score has no equal-width strata (ConfigError)."""
    live = hi >= lo
    if not (np.isfinite(lo[live]).all() and np.isfinite(hi[live]).all()):
        raise ConfigError("--strategy ccs needs finite scores (equal-width strata of the score range), but some "
                          "candidates score ±inf; leave them out with --min-score/--max-score")
    return np.where(hi > lo, (hi - lo) / k, 0.0)


def ccs_assign(s: np.ndarray, c: np.ndarray, lo: np.ndarray, step: np.ndarray, k: int) -> np.ndarray:
    """Stratum of each row: float64 scores ``s``, groups ``c``, the groups' ``lo`` and ``step``."""
    lo_r, st_r = lo[c], step[c]
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(st_r > 0, np.floor((s - lo_r) / np.where(st_r > 0, st_r, 1.0)), k - 1)
    b = np.clip(b, 0, k - 1)
    b = np.where(s < lo_r + b * st_r, b - 1, b)  # agree exactly with the edges lo + i * step
    b = np.where((b < k - 1) & (st_r > 0) & (s >= lo_r + (b + 1) * st_r), b + 1, b)
    return np.clip(b, 0, k - 1).astype(np.intp)


def ccs_allocate(budgets, sizes) -> np.ndarray:
    """CCS budget split (Zheng et al., ICLR 2023, Algorithm 1): visit the strata from the smallest up
    (ties: lower index first); each gets ``min(size, remaining budget // strata left)``.

    ``sizes`` is (groups, strata), ``budgets`` one per group; vectorised over groups. The total is
    exact whenever a group's budget fits in its strata.
    """
    sizes = np.atleast_2d(np.asarray(sizes, dtype=np.int64))
    rest = np.array(budgets, dtype=np.int64).reshape(-1).copy()
    k = sizes.shape[1]
    order = np.argsort(sizes, axis=1, kind="stable")
    s = np.take_along_axis(sizes, order, axis=1)
    got = np.zeros_like(s)
    for i in range(k):
        cur = np.minimum(s[:, i], rest // (k - i))
        got[:, i] = cur
        rest -= cur
    out = np.zeros_like(got)
    np.put_along_axis(out, order, got, axis=1)
    return out
