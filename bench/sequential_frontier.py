"""Choosing certify_sequential's grid-rule settings on held-out images, and what any procedure could
reach (docs/sequential.md, "The grid rule" and "How far from the best possible").

Input: the recorded votes of ``bench/sequential_certify.py`` (``--cache``) for images that are *not*
the benchmark's (default: test images 500–599; the benchmark reports images 0–499). For every image,
p is taken as its CERTIFY estimate p̂ = count / N, and ``--reps`` Bernoulli(p) vote streams of N
votes are drawn. On each stream the sequential procedure — looks, per-look α, running maximum of
exact Clopper–Pearson bounds, the grid rule with a given forecast optimism and patience — is
replayed in NumPy/SciPy, independently of the TensorFlow implementation, and CERTIFY is the bound of
the same stream's N votes (its prefix, as in the library). Reported per setting: N / mean samples and
the *expected* certified-accuracy difference to CERTIFY (pp) at every grid radius. (Expected, over
streams: one run of 500 images lands within about ±0.5 pp of it.)

It also reports a **lower bound for any procedure** on these images: a level-α sequential test of
"p ≤ t" that certifies an image with p > t with probability π needs on average at least
kl(π ‖ α) / KL(p ‖ t) samples (Wald; kl the binary relative entropy), whatever its stopping rule
and bound. With π = 1 at every image's CERTIFY grid level, and with the allowed 1 pp per grid radius
spent on the images where it saves the most (their bound at the level below; images CERTIFY
classifies wrongly need not be certified at all), N / that mean is the largest reduction any
procedure can reach with CERTIFY's table — even one that knows p. Since p is estimated, the bound
is also given with p estimated from the second half of each image's votes only (a noisier,
independent estimate: if the estimate's noise moved the bound, the two would differ).

**The alternative bound** (docs/sequential.md, "Why a union bound"): the same procedures with a
mixture confidence sequence instead of the union of Clopper–Pearson bounds — the likelihood ratio
of q against t averaged over q ~ Uniform[t, 1], valid at every look by Ville's inequality, so the
looks can be frequent (growth 1.05) — at every look with α/2 and the exact Clopper–Pearson bound
with α/2 at the last look; replayed on the same streams for the grid rule and for ``certify_at``
(at r ∈ {0.25, 0.5, 1, 1.5, 2}; futility from the mixture's upper bound, as the library's rule
uses the Clopper–Pearson upper bound).

    python bench/sequential_frontier.py --votes runs/votes/gaussian-s1.00-n100000-seed0.npz \\
        --sigma 1.0 --max-radius 2.75 --out docs/benchmarks/sequential-grid-frontier-s1.00.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.special import betainc, betaln
from scipy.stats import beta, norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import publish_markdown  # noqa: E402
from _votes import vote_prefix  # noqa: E402

# (growth, optimism, patience): the settings compared (first look 100, α/2 at the last look)
MIXTURE_GROWTH, MIXTURE_SHARE = 1.05, 0.5  # the alternative bound: looks, α share at the last look
MIXTURE_OPTIMISM = (2.0, 1.5, 1.25)
AT_RADII = (0.25, 0.5, 1.0, 1.5, 2.0)       # certify_at's radii (in the benchmark's units)
SETTINGS = [(2.0, 2.0, None), (1.25, 2.0, None), (1.25, 1.5, None), (1.25, 1.0, None),
            (1.25, 2.0, 50_000), (1.25, 2.0, 40_000), (1.25, 1.5, 50_000), (1.25, 1.5, 30_000),
            (1.25, 1.0, 50_000), (1.25, 1.0, 20_000)]


def cp_lower(k, n, a):
    k = np.asarray(k, float)
    n = np.broadcast_to(np.asarray(n, float), k.shape)
    return np.where(k > 0, beta.ppf(a, np.maximum(k, 1e-12), n - k + 1), 0.0)


def looks_of(first: int, growth: float, n: int) -> list[int]:
    looks, size = [], float(first)
    while round(size) < n:
        if not looks or round(size) > looks[-1]:
            looks.append(int(round(size)))
        size *= growth
    return looks + [n]


def replay(prefix, thresholds, *, growth, optimism, patience, alpha, n, first=100, share=0.5):
    """The grid rule on vote prefixes [I, n + 1] -> (samples [I], p_lower [I])."""
    looks = looks_of(first, growth, n)
    k_looks = len(looks)
    alphas = [alpha] if k_looks == 1 else [alpha * (1 - share) / (k_looks - 1)] * (k_looks - 1) \
        + [alpha * share]
    target = k_looks - 1 if patience is None else next(k for k, s in enumerate(looks)
                                                       if s >= patience)
    active = np.ones(len(prefix), bool)
    p_lower, samples = np.zeros(len(prefix)), np.zeros(len(prefix))
    for k, size in enumerate(looks):
        count = prefix[:, size]
        p_lower = np.where(active, np.maximum(p_lower, cp_lower(count, size, alphas[k])), p_lower)
        samples = np.where(active, size, samples)
        estimate = count / size
        hoped = np.minimum(1.0, estimate + optimism * np.sqrt(
            np.maximum(estimate * (1 - estimate), 1 / size) / size))
        forecast = cp_lower(hoped * looks[target], looks[target], alphas[target])
        next_threshold = np.where(thresholds[None, :] > p_lower[:, None], thresholds[None, :],
                                  2.0).min(axis=1)
        active &= ~((forecast < next_threshold) | (k == k_looks - 1))
    return samples, p_lower


def log_evidence(count, n, t):
    """ln of the likelihood ratio of q against t averaged over q ~ Uniform[t, 1]."""
    count, n = np.asarray(count, float), np.asarray(n, float)
    failures = n - count
    with np.errstate(divide="ignore", invalid="ignore"):
        return (betaln(count + 1, failures + 1) + np.log(betainc(failures + 1, count + 1, 1 - t))
                - count * np.log(t) - (failures + 1) * np.log1p(-t))


def mixture_rejects(count, n, t, a):
    """The mixture test of p ≤ t at level a (only t below count/(n + 1) can be rejected)."""
    count = np.asarray(count, float)
    inside = (t > 0) & (t < count / (n + 1.0))
    return inside & (log_evidence(count, n, np.where(inside, t, 0.5)) >= np.log(1 / a))


def mixture_clears(count, n, t, a_mix, a_final, last):
    """Whether a look with ``count`` of ``n`` votes certifies p > t under the mixture bound."""
    cleared = mixture_rejects(count, n, t, a_mix)
    return cleared | (cp_lower(count, n, a_final) >= t) if last else cleared


def replay_mixture(prefix, thresholds, *, optimism, alpha, n, first=100):
    """The grid rule under the mixture bound -> (samples [I], grid level reached [I])."""
    looks = looks_of(first, MIXTURE_GROWTH, n)
    a_mix, a_final = alpha * (1 - MIXTURE_SHARE), alpha * MIXTURE_SHARE
    rejected = np.zeros((len(prefix), len(thresholds)), bool)
    active, samples = np.ones(len(prefix), bool), np.zeros(len(prefix))
    level = np.zeros(len(prefix), int)
    for size in looks:
        count = prefix[:, size]
        last = size == n
        rejected |= active[:, None] & mixture_clears(count[:, None], size, thresholds[None, :],
                                                     a_mix, a_final, last)
        level = np.where(active, np.cumprod(rejected, axis=1).sum(axis=1), level)
        samples = np.where(active, size, samples)
        estimate = count / size
        hoped = np.minimum(1.0, estimate + optimism * np.sqrt(
            np.maximum(estimate * (1 - estimate), 1 / size) / size))
        following = thresholds[np.minimum(level, len(thresholds) - 1)]
        reachable = mixture_clears(hoped * n, n, following, a_mix, a_final, True)
        active &= ~((level >= len(thresholds)) | ~reachable | last)
    return samples, level


def certify_at_union(prefix, t, *, alpha, n, first=100, growth=1.25, share=0.5):
    """certify_at under the union bound (the library's rule) -> (samples, certified)."""
    looks = looks_of(first, growth, n)
    alphas = [alpha * (1 - share) / (len(looks) - 1)] * (len(looks) - 1) + [alpha * share]
    active, samples = np.ones(len(prefix), bool), np.zeros(len(prefix))
    certified = np.zeros(len(prefix), bool)
    if cp_lower(n, n, alphas[-1]) < t:
        return samples, certified
    for k, size in enumerate(looks):
        count = prefix[:, size]
        now = active & (cp_lower(count, size, alphas[k]) >= t)
        certified |= now
        samples = np.where(active, size, samples)
        upper = 1 - cp_lower(size - count, size, alphas[k])
        active &= ~(now | (cp_lower(upper * n, n, alphas[-1]) < t) | (k == len(looks) - 1))
    return samples, certified


def certify_at_mixture(prefix, t, *, alpha, n, first=100):
    """certify_at under the mixture bound -> (samples, certified)."""
    looks = looks_of(first, MIXTURE_GROWTH, n)
    a_mix, a_final = alpha * (1 - MIXTURE_SHARE), alpha * MIXTURE_SHARE
    active, samples = np.ones(len(prefix), bool), np.zeros(len(prefix))
    certified = np.zeros(len(prefix), bool)
    if not mixture_clears(float(n), n, t, a_mix, a_final, True):
        return samples, certified
    for size in looks:
        count = prefix[:, size].astype(float)
        now = active & mixture_clears(count, size, t, a_mix, a_final, size == n)
        certified |= now
        samples = np.where(active, size, samples)
        low, high = np.zeros(len(count)), (size - count) / (size + 1.0)  # failures' lower bound
        for _ in range(40):
            middle = (low + high) / 2
            rejected = mixture_rejects(size - count, size, middle, a_mix)
            low, high = np.where(rejected, middle, low), np.where(rejected, high, middle)
        hopeless = ~mixture_clears((1 - low) * n, n, t, a_mix, a_final, True)
        active &= ~(now | hopeless | (size == n))
    return samples, certified


def binary_kl(p, q):
    p, q = np.clip(p, 1e-15, 1 - 1e-15), np.clip(q, 1e-15, 1 - 1e-15)
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def lower_bound(count, correct, thresholds, alpha, n, allowed, estimate=None):
    """N / the least mean samples any level-α procedure needs for CERTIFY's grid levels
    (without and with ``allowed`` dropped (image, radius) pairs per grid radius); p = ``estimate``
    (default count / n)."""
    estimate = count / n if estimate is None else estimate
    level = (cp_lower(count, n, alpha)[:, None] >= thresholds[None, :]).sum(axis=1)

    def cost(i, lev):
        if lev == 0:
            return 0.0
        t = thresholds[lev - 1]
        return n if estimate[i] <= t else min(n, np.log(1 / alpha) / binary_kl(estimate[i], t))

    full = np.array([cost(i, lev) for i, lev in enumerate(level)])
    dropped = np.where(correct, full, 0.0)
    for lev in range(1, len(thresholds) + 1):
        members = np.where(correct & (level == lev))[0]
        savings = [full[i] - cost(i, lev - 1) for i in members]
        for j in np.argsort(savings)[::-1][:allowed]:
            dropped[members[j]] = cost(members[j], lev - 1)
    return n / full.mean(), n / max(dropped.mean(), 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--votes", required=True, help="a vote record of bench/_votes.py (.npz)")
    parser.add_argument("--sigma", type=float, required=True, help="σ of that checkpoint")
    parser.add_argument("--max-radius", type=float, required=True, help="the grid's last radius")
    parser.add_argument("--indices", default="500:600", help="held-out images START:STOP")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--reps", type=int, default=6, help="streams per image (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="markdown output (default: print)")
    args = parser.parse_args(argv)
    start, _, stop = args.indices.partition(":")
    with np.load(args.votes) as record:
        n = json.loads(str(record["settings"]))["n"]
        keep = (record["idx"] >= int(start)) & (record["idx"] < int(stop))
        bits, labels, guess = record["bits"][keep], record["label"][keep], record["guess"][keep]
    prefix = vote_prefix(bits, n)
    count = prefix[:, -1]
    grid = [0.25 * k for k in range(round(args.max_radius / 0.25) + 1)]
    thresholds = norm.cdf(np.array(grid) / args.sigma)
    thresholds[0] = 0.5
    allowed = int(0.01 * len(count) + 1e-9)
    bound, bound_dropped = lower_bound(count, guess == labels, thresholds, args.alpha, n, allowed)
    half = (prefix[:, -1] - prefix[:, n // 2]) / (n - n // 2)
    half_bound, half_dropped = lower_bound(count, guess == labels, thresholds, args.alpha, n,
                                           allowed, estimate=half)
    rng = np.random.default_rng(args.seed)
    p = np.repeat(count / n, args.reps)
    correct = np.repeat(guess == labels, args.reps)
    streams = np.zeros((len(p), n + 1), np.int32)
    np.cumsum(rng.random((len(p), n), dtype=np.float32) < p[:, None], axis=1, out=streams[:, 1:])
    reference = cp_lower(streams[:, -1], n, args.alpha)
    lines = [f"# certify_sequential grid rule on held-out images: σ = {args.sigma}, grid 0, 0.25, "
             f"…, {args.max_radius:g}", "",
             f"Generated by `bench/sequential_frontier.py` from the recorded votes of test images "
             f"{args.indices} ({len(count)} images; p = each image's CERTIFY estimate, "
             f"{args.reps} simulated streams per image; N = {n:,}, α = {args.alpha}).", "",
             f"Lower bound for any procedure (Wald; see the script): **{bound:.1f}×** fewer "
             f"samples with CERTIFY's table exactly, **{bound_dropped:.1f}×** when {allowed} "
             "image(s) per grid radius (1 %) may drop one grid radius "
             f"({half_bound:.1f}× and {half_dropped:.1f}× with p estimated from the second half "
             "of each image's votes only).", "",
             "| bound | growth | optimism (sd) | patience | fewer samples "
             "| largest expected gap (pp) | expected gap per grid radius (pp) |",
             "| --- " * 7 + "|"]

    def row(label, growth, optimism, patience, samples, level):
        gaps = [100 * (np.mean(correct & (level > j)) - np.mean(correct & (reference >= t)))
                for j, t in enumerate(thresholds)]
        lines.append(f"| {label} | {growth:g} | {optimism:g} | {patience or 'max_n'} | "
                     f"{n / samples.mean():.1f}× | {max(map(abs, gaps)):.2f} | "
                     + " ".join(f"{g:+.2f}" for g in gaps) + " |")

    for growth, optimism, patience in SETTINGS:
        samples, p_lower = replay(streams, thresholds, growth=growth, optimism=optimism,
                                  patience=patience, alpha=args.alpha, n=n)
        row("union", growth, optimism, patience, samples,
            (p_lower[:, None] >= thresholds[None, :]).sum(axis=1))
    for optimism in MIXTURE_OPTIMISM:
        samples, level = replay_mixture(streams, thresholds, optimism=optimism,
                                        alpha=args.alpha, n=n)
        row("mixture", MIXTURE_GROWTH, optimism, None, samples, level)
    lines += ["", "`certify_at`, fewer samples (mean over the radii; per radius) and certified "
              "sets differing from CERTIFY's (streams):", "",
              "| bound | growth | mean | " + " | ".join(f"r = {r:g}" for r in AT_RADII)
              + " | differing |", "| --- " * (len(AT_RADII) + 4) + "|"]
    for label, growth, procedure in [("union", 1.25, certify_at_union),
                                     ("mixture", MIXTURE_GROWTH, certify_at_mixture)]:
        means, differing = [], 0
        for radius in AT_RADII:
            t = norm.cdf(radius / args.sigma)
            samples, certified = procedure(streams, t, alpha=args.alpha, n=n)
            means.append(samples.mean())
            differing += int(np.sum(certified != (reference >= t)))
        lines.append(f"| {label} | {growth:g} | {n / np.mean(means):.1f}× | "
                     + " | ".join(f"{n / m:.1f}×" if m else "no samples" for m in means)
                     + f" | {differing} |")
    publish_markdown(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
