"""The paper's toy model (examples/perceptron_theory.py): solver, sampling, and the keep-easy/keep-hard
crossover of Sorscher et al. 2022, Fig. 1, at a tiny size (N = 50, averaged over seeds)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "perceptron_theory.py"


@pytest.fixture(scope="module")
def pt(mk):
    with mk.module(SCRIPT) as mod:
        yield mod


def mean_err(pt, N, alpha_tot, f, keep, theta=0.0, repeats=12, seed=7):
    return float(np.mean([pt.simulate(N, alpha_tot, f, keep, theta, seed=np.random.default_rng([seed, r]))
                          for r in range(repeats)]))


# ------------------------------------------------------------------------------------ building blocks

def test_max_margin_matches_brute_force_in_2d(pt):
    rng = np.random.default_rng(0)
    for _ in range(5):
        X = rng.standard_normal((40, 2))
        u = rng.standard_normal(2)
        y = np.sign(X @ u)
        J = pt.max_margin(X, y)
        ang = np.linspace(0, 2 * np.pi, 200_001)
        W = np.stack([np.cos(ang), np.sin(ang)], 1)
        margins = ((y[:, None] * X) @ W.T).min(0)
        best = W[np.argmax(margins)]
        got = J / np.linalg.norm(J)
        assert np.arccos(np.clip(got @ best, -1, 1)) < 1e-3
        # exact optimum: at least as good as the best of 200k grid angles, and only grid-resolution better
        assert margins.max() - 1e-12 <= (y * (X @ got)).min() <= margins.max() + 1e-4


def test_max_margin_beats_teacher_margin_and_separates(pt):
    X, y = pt.sample_pruned(60, 6.0, 0.3, "hard", 0.0, np.random.default_rng(1))
    J = pt.max_margin(X, y)
    m_student = (y * (X @ J)).min() / np.linalg.norm(J)
    m_teacher = (y * X[:, 0]).min()  # teacher = e_1
    assert m_student > 0
    assert m_student >= m_teacher - 1e-9


def test_test_error_formula_matches_monte_carlo(pt):
    rng = np.random.default_rng(2)
    N = 20
    J = np.zeros(N)
    J[0], J[1:] = 1.0, 0.15 * rng.standard_normal(N - 1)
    x = rng.standard_normal((200_000, N))
    mc = np.mean(np.sign(x @ J) != np.sign(x[:, 0]))
    assert pt.test_error(J) == pytest.approx(mc, abs=0.004)
    T = np.zeros(N)
    T[0] = 3.0
    assert pt.test_error(J, T) == pytest.approx(pt.test_error(J))


@pytest.mark.parametrize("theta", [0.0, math.radians(20)])
def test_sample_pruned_keeps_the_right_examples(pt, theta):
    N, alpha_tot, f = 40, 5.0, 0.25
    k = int(round(f * round(alpha_tot * N)))
    probe = np.zeros(N)
    probe[0], probe[1] = math.cos(theta), math.sin(theta)
    Xh, yh = pt.sample_pruned(N, alpha_tot, f, "hard", theta, np.random.default_rng(3))
    Xe, ye = pt.sample_pruned(N, alpha_tot, f, "easy", theta, np.random.default_rng(3))
    assert Xh.shape == Xe.shape == (k, N)
    np.testing.assert_array_equal(yh, np.sign(Xh[:, 0]))  # labels come from the teacher, not the probe
    # same raw draw: every kept-hard score is below every kept-easy score
    assert np.abs(Xh @ probe).max() <= np.abs(Xe @ probe).min()
    # the kept fraction is the tail of |N(0,1)|: hard ones lie within the f-quantile, roughly
    q = 0.3186  # P(|z| < q) = 0.25
    assert np.abs(Xh @ probe).max() == pytest.approx(q, rel=0.35)


# ------------------------------------------------------------------------------------ the paper's findings

@pytest.mark.parametrize("f", [0.2, 0.3, 0.4])
def test_crossover_easy_wins_when_data_is_scarce_hard_when_abundant(pt, f):
    N = 50
    # scarce: alpha_tot = 2 (P = 100 examples for 50 parameters) -> keeping easy examples is better
    hard, easy = mean_err(pt, N, 2.0, f, "hard"), mean_err(pt, N, 2.0, f, "easy")
    assert easy < 0.7 * hard, (f, easy, hard)  # measured ratio ~0.47
    # abundant: alpha_tot = 10 / f (10 kept examples per parameter) -> keeping hard examples is better
    hard, easy = mean_err(pt, N, 10.0 / f, f, "hard"), mean_err(pt, N, 10.0 / f, f, "easy")
    assert hard < 0.85 * easy, (f, hard, easy)  # measured ratio 0.50 (f=0.2) .. 0.71 (f=0.4)


def test_pruning_beats_the_unpruned_learning_curve_at_large_alpha(pt):
    N, alpha = 50, 10.0
    full = mean_err(pt, N, alpha, 1.0, "random")
    hard = mean_err(pt, N, alpha / 0.1, 0.1, "hard")
    assert hard < 0.3 * full, (hard, full)  # same kept-set size, ~8x lower error (measured)


def test_imperfect_probe_keep_easy_stalls_near_theta_over_pi(pt):
    N, theta = 50, math.radians(20)
    easy = mean_err(pt, N, 10.0 / 0.2, 0.2, "easy", theta)
    full = mean_err(pt, N, 10.0, 1.0, "random")
    assert 0.75 * (20 / 180) < easy < 1.3 * (20 / 180), easy  # the student learns the probe, not the teacher
    assert easy > 1.5 * full


def test_script_writes_png_quick(tmp_path):
    out = tmp_path / "fig.png"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--seed", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert "theta = 0 deg" in r.stdout and "theta = 10 deg" in r.stdout
    assert "best" in r.stdout and f"wrote {out}" in r.stdout
