"""The depth-study statistics on constructed results where the answer is known."""

from __future__ import annotations

import numpy as np

from fpm.eval.stats import bootstrap_best, neighbour_tests, paired_permutation


def correctness(accuracies: list[float], n_seeds: int = 3, n: int = 2000, seed: int = 0, shared: float = 0.0):
    """(depths, seeds, examples) 0/1 with the given accuracies; ``shared`` makes depths agree on
    most examples (as models scored on the same dev set do)."""
    rng = np.random.default_rng(seed)
    base = rng.random(n)
    out = np.empty((len(accuracies), n_seeds, n))
    for d, acc in enumerate(accuracies):
        for s in range(n_seeds):
            u = np.where(rng.random(n) < shared, base, rng.random(n))
            out[d, s] = u < acc
    return out


def test_one_clearly_better_depth_is_found_with_a_ci_that_excludes_the_others():
    depths = [50, 60, 70, 80, 90]
    c = correctness([0.80, 0.80, 0.88, 0.80, 0.79], shared=0.8)
    boot = bootstrap_best(c, depths, n_boot=1000)
    assert boot["best_depth"] == 70 and boot["clearly_best"]
    assert all(m["excludes_zero"] for m in boot["margins"].values())
    assert boot["per_depth"][70]["p_best"] > 0.99
    others_hi = max(boot["per_depth"][d]["hi"] for d in depths if d != 70)
    assert boot["per_depth"][70]["lo"] > others_hi  # the best depth's CI sits above every other depth's
    tests = {(t["shallower"], t["deeper"]): t for t in neighbour_tests(c, depths, n_perm=4000)}
    assert tests[(60, 70)]["significant"] and tests[(70, 80)]["significant"]
    assert not tests[(50, 60)]["significant"]


def test_two_indistinguishable_depths_are_not_called_different():
    depths = [50, 70]
    c = correctness([0.85, 0.85], shared=0.9, seed=1)
    boot = bootstrap_best(c, depths, n_boot=1000)
    assert not boot["clearly_best"]
    assert 0.05 < boot["per_depth"][50]["p_best"] < 0.95
    (m,) = boot["margins"].values()
    assert m["lo"] < 0 < m["hi"]
    res = paired_permutation(c[0], c[1], n_perm=4000)
    assert res["p_value"] > 0.05


def test_identical_results_share_the_win_and_give_p_one():
    c = correctness([0.7, 0.7], n_seeds=1, seed=2)
    c[1] = c[0]
    boot = bootstrap_best(c, [5, 9], n_boot=200)
    assert boot["per_depth"][5]["p_best"] == boot["per_depth"][9]["p_best"] == 0.5
    assert boot["tied_with"] == [9] and not boot["clearly_best"]
    assert paired_permutation(c[0], c[1])["p_value"] == 1.0


def test_permutation_p_value_is_calibrated_under_the_null():
    rng = np.random.default_rng(3)
    pvals = []
    for k in range(200):
        a = (rng.random((1, 300)) < 0.7).astype(float)
        b = (rng.random((1, 300)) < 0.7).astype(float)
        pvals.append(paired_permutation(a, b, n_perm=500, seed=k)["p_value"])
    assert 0.02 < np.mean(np.array(pvals) < 0.05) < 0.10
