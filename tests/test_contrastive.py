"""CustomContrast's losses (customjax.contrastive, seed 000 Eqs. 4, 7, 8, 9) against hand computations
with plain loops over small arrays: CSCL's two directions without the positive in the denominators,
MACL's per-layer sums, its alpha = 1 / r scaling and its positives (other views of the subject), the
location loss's direction."""

import math

import jax
import numpy as np
import pytest

from customjax import contrastive as C


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_cscl_is_eq4_by_hand():
    rng = np.random.default_rng(0)
    v, t = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    n = len(v)
    a = [[_cos(v[i], t[j]) for j in range(n)] for i in range(n)]
    want = 0.0
    for i in range(n):
        want -= math.log(math.exp(a[i][i]) / sum(math.exp(a[j][i]) for j in range(n) if j != i)) / n
        want -= math.log(math.exp(a[i][i]) / sum(math.exp(a[i][j]) for j in range(n) if j != i)) / n
    got = float(C.cscl_loss(v.astype(np.float32), t.astype(np.float32)))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    # aligned pairs score lower than shuffled ones; the two directions differ for an asymmetric a
    assert float(C.cscl_loss(v, v + 0.01 * t)) < float(C.cscl_loss(v, t[::-1]))
    half = -np.mean([math.log(math.exp(a[i][i]) / sum(math.exp(a[j][i]) for j in range(n) if j != i))
                     for i in range(n)])
    assert abs(half - want / 2) > 1e-3          # column and row terms are not the same number


def _macl_by_hand(s, subject, r, tau, floor):
    n, l = s.shape[:2]
    alpha = [[1.0 / max(r[i][j], floor) for j in range(n)] for i in range(n)]
    terms = []
    for i in range(n):
        for j in range(n):
            if i == j or subject[i] != subject[j]:
                continue
            loss = 0.0
            for a in range(l):
                num = math.exp(alpha[i][j] * _cos(s[i, a], s[j, a]) / tau)
                den = sum(math.exp(alpha[i][k] * _cos(s[i, a], s[k, a]) / tau) for k in range(n) if k != i)
                loss -= math.log(num / den)
            terms.append(loss)
    return sum(terms) / len(terms) if terms else 0.0


def test_macl_is_eq7_by_hand_with_its_scaling_and_positives():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((5, 3, 4))
    subject = np.array([0, 1, 0, 2, 1])            # two subjects seen twice: pairs (0, 2), (1, 4) both ways
    r = rng.uniform(0.2, 1.0, (5, 5))
    r = (r + r.T) / 2
    np.fill_diagonal(r, 1.0)
    r[0, 3] = r[3, 0] = -0.3                       # unrelated subjects: clipped to the floor
    for tau in (0.07, 0.5):
        want = _macl_by_hand(s, subject, r, tau, 0.05)
        got = float(C.macl_loss(s.astype(np.float32), subject, r.astype(np.float32), temperature=tau))
        assert got == pytest.approx(want, rel=2e-4), tau
    # the scaling matters: alpha = 1 (r = 1 everywhere) gives another value
    flat = float(C.macl_loss(s, subject, np.ones((5, 5)), temperature=0.5))
    assert abs(flat - _macl_by_hand(s, subject, np.ones((5, 5)), 0.5, 0.05)) < 1e-4
    assert abs(flat - _macl_by_hand(s, subject, r, 0.5, 0.05)) > 1e-2
    # which samples are positives matters; no positive pair in the batch: 0
    other = float(C.macl_loss(s, np.array([0, 0, 1, 2, 1]), r, temperature=0.5))
    assert abs(other - _macl_by_hand(s, subject, r, 0.5, 0.05)) > 1e-3
    assert float(C.macl_loss(s, np.arange(5), r)) == 0.0
    # pulling the positives together lowers it
    close = s.copy()
    close[2], close[4] = s[0] + 0.01, s[1] + 0.01
    assert float(C.macl_loss(close, subject, r, temperature=0.5)) < float(C.macl_loss(s, subject, r, temperature=0.5))


def test_location_loss_rewards_attention_on_the_mask():
    mask = np.zeros((1, 4, 4), np.float32)
    mask[0, :2, :2] = 1.0
    on = mask / mask.sum()
    off = (1 - mask) / (1 - mask).sum()
    uniform = np.full((1, 4, 4), 1 / 16, np.float32)
    want = lambda A: float(np.mean((1 - mask) * A) - np.mean(mask * A))   # noqa: E731
    for A in (on, off, uniform):
        assert float(C.location_loss(A, mask)) == pytest.approx(want(A), abs=1e-7)
    assert float(C.location_loss(on, mask)) < float(C.location_loss(uniform, mask)) < float(C.location_loss(off, mask))
    g = jax.grad(lambda A: C.location_loss(A, mask))(uniform)
    assert (np.asarray(g)[mask > 0] < 0).all() and (np.asarray(g)[mask == 0] > 0).all()


def test_total_is_eq9_and_everything_jits_and_differentiates():
    assert float(C.total_loss(1.0, 2.0, 3.0, 4.0)) == pytest.approx(1.0 + 1e-2 * 5.0 + 1e-3 * 4.0)
    rng = np.random.default_rng(2)
    s, v = rng.standard_normal((4, 2, 8)).astype(np.float32), rng.standard_normal((4, 8)).astype(np.float32)
    subject, r = np.array([0, 0, 1, 1]), np.full((4, 4), 0.5, np.float32)
    f = jax.jit(lambda s, v: C.macl_loss(s, subject, r) + C.cscl_loss(v, s[:, 0]))
    gs, gv = jax.grad(f, argnums=(0, 1))(s, v)
    assert np.isfinite(gs).all() and np.isfinite(gv).all() and np.abs(gs).sum() > 0 and np.abs(gv).sum() > 0
