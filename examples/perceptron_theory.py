#!/usr/bin/env python
"""The teacher-student perceptron toy model of data pruning (Sorscher et al. 2022, NeurIPS, Fig. 1).

Setting
-------
* Inputs x ~ N(0, I_N); a teacher perceptron T (unit vector) labels them, y = sign(T.x).
* A dataset of P = alpha_tot * N examples is pruned to a kept fraction f by a margin score:
  - perfect metric: the margin |T.x| with respect to the teacher;
  - imperfect metric: the margin |T_p.x| with respect to a probe T_p at angle theta from T.
  ``keep="hard"`` keeps the f*P examples with the *smallest* |margin| (closest to the probe's
  boundary), ``keep="easy"`` the f*P with the largest, ``keep="random"`` a uniform subset.
* A student perceptron J is trained on the kept examples and scored by its exact test error
  eps = arccos(R) / pi,  R = J.T / (|J| |T|)   (the probability that sign(J.x) != sign(T.x)).
* Learning curves are plotted against alpha = P_kept / N, the kept examples per parameter
  (the paper's alpha_prune), for several kept fractions f.

Student
-------
The student is the max-margin (hard-margin SVM) perceptron through the origin, the solution the
paper's replica theory describes: J maximises min_mu y_mu J.x_mu / |J|.  The kept set is always
linearly separable (the teacher separates it), and the max-margin direction is the point of the
convex hull of {y_mu x_mu} nearest the origin.  We find that point exactly with scipy's
non-negative least squares,

    min_{a >= 0}  |Z^T a|^2 + (sum(a) - 1)^2,    Z = y[:, None] * X,   J = Z^T a,

whose solution is the nearest hull point scaled by 1 / (1 + |p|^2), so the direction is exact (no
regularisation constant to tune, no learning rate, no early stopping).  ``max_margin`` checks the
KKT condition (every example has margin >= the support vectors' margin) before returning.

Sampling shortcut
-----------------
By rotation invariance of N(0, I_N) and of the max-margin rule we take T = e_1 and the probe
T_p = cos(theta) e_1 + sin(theta) e_2.  The pruning score only depends on (x_1, x_2), so we draw those
two coordinates for all P examples, prune, and draw the other N - 2 independent coordinates for the
kept examples only.  This is exactly the same distribution as drawing all P full vectors, and lets
alpha_tot = alpha / f reach the hundreds cheaply.

Usage
-----
    python examples/perceptron_theory.py                      # default size, a few minutes on 2 cores
    python examples/perceptron_theory.py --quick --out /tmp/p.png
    python examples/perceptron_theory.py --n 200 --repeats 6 --seed 0 --theta 10 --out fig.png

Prints a table of mean test errors and writes a PNG with three panels: (a) perfect metric, keep
hard vs keep easy for several f; (b) the frontier when the best f (and strategy) is chosen for each
alpha, against the unpruned power law; (c) the same curves with the imperfect probe (theta > 0).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

KEEPS = ("hard", "easy", "random")


# ------------------------------------------------------------------------------------------ model

def sample_pruned(N: int, alpha_tot: float, f: float, keep: str = "hard", theta: float = 0.0,
                  rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw P = round(alpha_tot * N) teacher-labelled Gaussian examples and keep round(f * P) of them.

    Teacher T = e_1; pruning score = |x . T_p| with the probe T_p = cos(theta) e_1 + sin(theta) e_2
    (theta in radians; theta = 0 is the perfect metric).  Returns (X_kept, y_kept).
    """
    if keep not in KEEPS:
        raise ValueError(f"keep must be one of {KEEPS}, got {keep!r}")
    if not 0 < f <= 1:
        raise ValueError(f"f must be in (0, 1], got {f}")
    if N < 2:
        raise ValueError("N must be >= 2")
    rng = np.random.default_rng(rng)
    P = int(round(alpha_tot * N))
    k = int(round(f * P))
    if k < 1:
        raise ValueError(f"no examples kept (alpha_tot={alpha_tot}, f={f}, N={N})")
    x12 = rng.standard_normal((P, 2))
    score = np.abs(math.cos(theta) * x12[:, 0] + math.sin(theta) * x12[:, 1])
    if keep == "random" or k == P:
        idx = rng.permutation(P)[:k]
    else:
        order = np.argsort(score, kind="stable")
        idx = order[:k] if keep == "hard" else order[P - k:]
    X = np.empty((k, N))
    X[:, :2] = x12[idx]
    X[:, 2:] = rng.standard_normal((k, N - 2))
    y = np.where(X[:, 0] >= 0, 1.0, -1.0)
    return X, y


def max_margin(X: np.ndarray, y: np.ndarray, check: bool = True) -> np.ndarray:
    """Max-margin perceptron through the origin (hard-margin SVM, no bias) for separable (X, y).

    Returns J (unnormalised) with direction argmax_{|J|=1} min_mu y_mu J.x_mu.
    """
    Z = y[:, None] * X
    k, N = Z.shape
    A = np.vstack([Z.T, np.ones((1, k))])
    b = np.zeros(N + 1)
    b[-1] = 1.0
    a, _ = nnls(A, b, maxiter=50 * (k + N))
    s = a.sum()
    J = Z.T @ a
    if check:
        # KKT for the nearest hull point p = J / s: z.p >= |p|^2 for every example.
        gamma = (J @ J) / s
        worst = (Z @ J).min()
        if not (s > 0 and worst >= gamma * (1 - 1e-6) - 1e-12):
            raise RuntimeError(f"max-margin solve did not converge (worst {worst:.3g} < {gamma:.3g})")
    return J


def test_error(J: np.ndarray, T: np.ndarray | None = None) -> float:
    """Exact generalisation error arccos(R)/pi of student J against teacher T (default e_1)."""
    if T is None:
        R = J[0] / np.linalg.norm(J)
    else:
        R = (J @ T) / (np.linalg.norm(J) * np.linalg.norm(T))
    return float(np.arccos(np.clip(R, -1.0, 1.0)) / np.pi)


def simulate(N: int, alpha_tot: float, f: float, keep: str = "hard", theta: float = 0.0,
             seed: int | np.random.Generator | None = 0) -> float:
    """One run: sample, prune, train the max-margin student, return its test error.

    ``theta`` is the probe's angle from the teacher in radians (0 = perfect metric).
    """
    X, y = sample_pruned(N, alpha_tot, f, keep, theta, np.random.default_rng(seed))
    return test_error(max_margin(X, y))


def mean_error(N: int, alpha_tot: float, f: float, keep: str = "hard", theta: float = 0.0,
               repeats: int = 5, seed: int | list[int] = 0) -> tuple[float, float]:
    """Mean and standard error of ``simulate`` over ``repeats`` independent seeds."""
    base = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    errs = [simulate(N, alpha_tot, f, keep, theta, seed=np.random.default_rng(base + [r]))
            for r in range(repeats)]
    m = float(np.mean(errs))
    se = float(np.std(errs, ddof=1) / np.sqrt(repeats)) if repeats > 1 else float("nan")
    return m, se


# ------------------------------------------------------------------------------------------ sweep

@dataclass
class Sweep:
    """Mean/SE test errors on a grid: err[keep][f] is an array over ``alphas`` (= P_kept / N)."""
    N: int
    theta_deg: float
    alphas: np.ndarray
    fracs: tuple[float, ...]
    repeats: int
    err: dict = field(default_factory=dict)
    se: dict = field(default_factory=dict)

    def full(self) -> np.ndarray:
        """Unpruned learning curve (f = 1; identical in law to random pruning)."""
        return self.err["full"][1.0]

    def frontier(self) -> tuple[np.ndarray, list[tuple[str, float]]]:
        """Best error over every (keep, f) for each alpha, and which (keep, f) achieved it."""
        best = self.full().copy()
        arg = [("full", 1.0)] * len(self.alphas)
        for keep in ("hard", "easy"):
            for f in self.fracs:
                if f >= 1.0:
                    continue
                e = self.err[keep][f]
                for i in range(len(self.alphas)):
                    if e[i] < best[i]:
                        best[i], arg[i] = e[i], (keep, f)
        return best, arg


def run_sweep(N: int, alphas, fracs, theta_deg: float = 0.0, repeats: int = 5, seed: int = 0,
              log=None) -> Sweep:
    """Run every (keep, f, alpha) of the grid, ``repeats`` seeds each (alpha_tot = alpha / f)."""
    alphas = np.asarray(alphas, dtype=float)
    fracs = tuple(sorted({float(f) for f in fracs} | {1.0}, reverse=True))
    sw = Sweep(N, theta_deg, alphas, fracs, repeats)
    theta = math.radians(theta_deg)
    jobs = [("full", 1.0)] + [(k, f) for f in fracs if f < 1.0 for k in ("hard", "easy")]
    for j, (keep, f) in enumerate(jobs):
        m = np.empty(len(alphas))
        s = np.empty(len(alphas))
        for i, a in enumerate(alphas):
            # one seed stream per (f, alpha), shared by hard/easy and by every theta, so that the
            # strategies being compared see the same raw draws (common random numbers)
            m[i], s[i] = mean_error(N, a / f, f, "random" if keep == "full" else keep, theta,
                                    repeats, seed=grid_seed(seed, f, i))
        sw.err.setdefault(keep, {})[f] = m
        sw.se.setdefault(keep, {})[f] = s
        if log:
            log(f"  theta={theta_deg:g}  {keep:>4} f={f:<4g} done ({j + 1}/{len(jobs)})")
    return sw


def grid_seed(seed: int, f: float, i: int) -> list[int]:
    """Deterministic seed for grid point (f, alpha index i) of run ``seed``."""
    return [seed, int(round(f * 1e6)), i]


def power_law_fit(alphas: np.ndarray, err: np.ndarray, min_alpha: float = 2.0) -> tuple[float, float]:
    """Fit err = c * alpha^-nu on alpha >= min_alpha (log-log least squares); returns (c, nu)."""
    sel = alphas >= min_alpha
    if sel.sum() < 2:
        sel = np.ones_like(alphas, dtype=bool)
    slope, icpt = np.polyfit(np.log(alphas[sel]), np.log(err[sel]), 1)
    return float(np.exp(icpt)), float(-slope)


# ------------------------------------------------------------------------------------------ output

def format_table(sw: Sweep) -> str:
    fr = [f for f in sw.fracs if f < 1.0]
    head = f"{'alpha':>6} {'f=1':>6} " + " ".join(f"{'H' + f'{f:g}':>6} {'E' + f'{f:g}':>6}" for f in fr)
    head += f"  {'best':>6}  choice"
    lines = [f"theta = {sw.theta_deg:g} deg  (N={sw.N}, {sw.repeats} repeats; H = keep hard, E = keep easy; "
             "test error, mean over repeats)", head]
    best, arg = sw.frontier()
    for i, a in enumerate(sw.alphas):
        row = f"{a:6.3g} {sw.full()[i]:6.4f} "
        row += " ".join(f"{sw.err['hard'][f][i]:6.4f} {sw.err['easy'][f][i]:6.4f}" for f in fr)
        k, f = arg[i]
        row += f"  {best[i]:6.4f}  {'full' if k == 'full' else f'{k} f={f:g}'}"
        lines.append(row)
    se = np.concatenate([np.ravel(list(d.values())) for d in sw.se.values()])
    rel = np.concatenate([np.ravel(list(sw.se[k].values())) / np.ravel(list(sw.err[k].values()))
                          for k in sw.err])
    lines.append(f"(standard error over repeats: median {np.nanmedian(se):.4f} absolute, "
                 f"{100 * np.nanmedian(rel):.0f}% relative)")
    return "\n".join(lines)


def plot(perfect: Sweep, noisy: Sweep | None, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    fr = [f for f in perfect.fracs if f < 1.0]
    cmap = plt.get_cmap("viridis")
    colors = {f: cmap(0.9 * i / max(1, len(fr) - 1)) for i, f in enumerate(fr)}
    xlabel = r"$\alpha$ = kept examples per parameter  ($P_{\rm kept}/N$)"
    ylabel = r"test error  $\arccos(R)/\pi$"
    ncols = 3 if noisy is not None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.6 * ncols, 5.0), constrained_layout=True)

    def style(ax, title):
        ax.set_xscale("log")
        ax.set_yscale("log")
        lo, hi = perfect.alphas.min(), perfect.alphas.max()
        ticks = [t for t in (0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100) if lo <= t <= hi]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10.5)
        ax.grid(True, which="both", alpha=0.25)

    def curves(ax, sw: Sweep, title: str):
        a = sw.alphas
        ax.plot(a, sw.full(), color="k", lw=2.4, marker="o", ms=4, zorder=5)
        for f in fr:
            ax.plot(a, sw.err["hard"][f], color=colors[f], lw=1.8, marker="o", ms=3.5)
            ax.plot(a, sw.err["easy"][f], color=colors[f], lw=1.4, ls="--", marker="s", ms=3,
                    mfc="none")
        style(ax, title)
        handles = [Line2D([], [], color="k", lw=2.4, marker="o", ms=4, label="f = 1 (no pruning)")]
        handles += [Line2D([], [], color=colors[f], lw=1.8, label=f"f = {f:g}") for f in fr]
        handles += [Line2D([], [], color="gray", lw=1.8, marker="o", ms=3.5, label="keep hard (solid)"),
                    Line2D([], [], color="gray", lw=1.4, ls="--", marker="s", ms=3, mfc="none",
                           label="keep easy (dashed)")]
        ax.legend(handles=handles, fontsize=8, loc="lower left", framealpha=0.9)

    curves(axes[0], perfect, "(a) perfect metric: prune by margin w.r.t. the teacher\n"
                             "keep easy wins at small $\\alpha$, keep hard wins at large $\\alpha$")

    ax = axes[1]
    a = perfect.alphas
    full = perfect.full()
    c, nu = power_law_fit(a, full)
    ax.plot(a, full, color="k", lw=2.4, marker="o", ms=4, label="f = 1 (no pruning)")
    af = a[a >= 1.0]
    ax.plot(af, c * af ** -nu, color="k", lw=1, ls=":",
            label=fr"power law fitted to f = 1 ($\alpha \geq 2$): ${c:.2f}\,\alpha^{{-{nu:.2f}}}$")
    fronts = [(perfect, "crimson", "perfect metric", (-4, -14))]
    if noisy is not None:
        fronts.append((noisy, "darkorange", f"probe at $\\theta$ = {noisy.theta_deg:g}°", (4, 6)))
    for sw, col, name, offset in fronts:
        best, arg = sw.frontier()
        ax.plot(sw.alphas, best, color=col, lw=2.4, label=f"best (keep, f) per $\\alpha$, {name}")
        for i, (k, f) in enumerate(arg):
            ax.plot(sw.alphas[i], best[i], marker="s" if k == "easy" else "o", ms=7, ls="none",
                    color="k" if k == "full" else colors[f], mec=col, mew=1.3)
            if i == 0 or arg[i] != arg[i - 1]:  # label where the best choice changes
                ax.annotate("f=1" if k == "full" else f"{k[0].upper()}{f:g}", (sw.alphas[i], best[i]),
                            textcoords="offset points", xytext=offset, fontsize=8, color=col,
                            fontweight="bold")
    style(ax, "(b) the best (keep, f) for each $\\alpha$ beats the power law\n"
              "labels: E = keep easy, H = keep hard, then f")
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)

    if noisy is not None:
        ax = axes[2]
        curves(ax, noisy, f"(c) imperfect metric: prune by margin w.r.t. a probe at "
                          f"$\\theta$ = {noisy.theta_deg:g}°\n"
                          "too small f hurts; keep easy stalls at the probe's error $\\theta/\\pi$")
        ax.axhline(noisy.theta_deg / 180.0, color="gray", lw=1, ls=":")
        ax.annotate(r"$\theta/\pi$ (error of the probe itself)", (noisy.alphas[0], noisy.theta_deg / 180.0),
                    textcoords="offset points", xytext=(0, -11), fontsize=8, color="dimgray")
    lo = min(ax_.get_ylim()[0] for ax_ in axes)
    hi = max(ax_.get_ylim()[1] for ax_ in axes)
    for ax_ in axes:
        ax_.set_ylim(lo, min(hi, 0.7))
    fig.suptitle(f"Teacher–student perceptron (Sorscher et al. 2022, Fig. 1): max-margin student, "
                 f"N = {perfect.N}, mean of {perfect.repeats} run{'s' if perfect.repeats > 1 else ''} per point", fontsize=12)
    fig.savefig(out, dpi=100, pil_kwargs={"optimize": True})
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI

DEFAULT_ALPHAS = (0.3, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0)
DEFAULT_FRACS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="input dimension N (default 200; 30 with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help="independent runs per point (default 5; 2 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--theta", type=float, default=10.0,
                   help="probe angle in degrees for the imperfect-metric panel (0 to skip; default 10)")
    p.add_argument("--out", default="examples/perceptron_theory.png", help="PNG path")
    p.add_argument("--quick", action="store_true",
                   help="tiny size (N=30, 2 repeats, 3 alphas, f in {0.5, 0.2}): seconds")
    args = p.parse_args(argv)

    alphas, fracs, N, repeats = DEFAULT_ALPHAS, DEFAULT_FRACS, 200, 5
    if args.quick:
        alphas, fracs, N, repeats = (0.5, 2.0, 8.0), (0.5, 0.2), 30, 2
    N = args.n if args.n is not None else N
    repeats = args.repeats if args.repeats is not None else repeats
    if N < 2 or repeats < 1:
        p.error("--n must be >= 2 and --repeats >= 1")
    t0 = time.time()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    perfect = run_sweep(N, alphas, fracs, 0.0, repeats, args.seed, log)
    noisy = run_sweep(N, alphas, fracs, args.theta, repeats, args.seed, log) if args.theta > 0 else None
    print(format_table(perfect))
    c, nu = power_law_fit(perfect.alphas, perfect.full())
    print(f"power-law fit to f=1 on alpha>=2: err = {c:.3f} * alpha^-{nu:.3f}")
    if noisy is not None:
        print()
        print(format_table(noisy))
    plot(perfect, noisy, args.out)
    print(f"\nwrote {args.out}  ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
