"""Statistical checks shared by the sampling tests: does a set of draws follow a given distribution?"""
from __future__ import annotations

import math

import torch


def assert_follows(tokens: torch.Tensor, probs: torch.Tensor, *, what: str = "draws") -> None:
    """Chi-square goodness of fit of integer draws to probs (vocab,), at the 0.1% level.

    Bins of expected count < 5 are pooled into one. The draws come from fixed seeds, so the test is deterministic;
    the limit is the upper 0.1% point of chi-square(dof) by the Wilson-Hilferty approximation (z = 3.09).
    """
    tokens, probs = tokens.cpu(), probs.double().cpu()
    n = tokens.numel()
    assert n > 0, f"{what}: no draws"
    assert bool((probs[tokens] > 0).all()), f"{what}: a draw has probability 0"
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(exp) - 1
    assert dof >= 1, f"{what}: too few draws for a chi-square test"
    limit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, f"{what}: chi-square {chi2:.1f} over {dof} degrees of freedom exceeds {limit:.1f}"
