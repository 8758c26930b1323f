"""The rank rules on hand-made spectra, with the expected numbers worked out from the definitions."""

import pytest
import torch

from omnimerge.errors import OmnimergeError
from omnimerge.methods.ranks import (NAMED, check_rank_rule, choose_rank, entropy, gavish_donoho, knee,
                                     participation_sqrt, rank_param, stable_rank)


def S(*values):
    return torch.tensor(values, dtype=torch.float64)


def low_rank_plus_noise(m, n, r, noise, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, r, generator=g, dtype=torch.float64)
    y = torch.randn(r, n, generator=g, dtype=torch.float64)
    return x @ y + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------- knee


def test_knee_flat_spectrum_is_one():
    # y_i = 0 for all i (σ_1 = σ_r), so every d_i = 0 and argmax = 0 -> k = max(1, 0) = 1
    assert knee(torch.ones(10, dtype=torch.float64)) == 1
    assert knee(torch.full((50,), 3.0)) == 1


def test_knee_two_point_and_single_value_spectra():
    assert knee(S(3.0, 1.0)) == 1
    assert knee(S(1.0, 1.0)) == 1
    assert knee(S(5.0)) == 1


@pytest.mark.parametrize("r,shape", [(1, (40, 30)), (2, (30, 50)), (3, (50, 80)), (5, (64, 64)),
                                     (8, (120, 60)), (12, (90, 150))])
def test_knee_finds_the_rank_of_low_rank_plus_noise(r, shape):
    a = low_rank_plus_noise(*shape, r, 1e-3, seed=r)
    s = torch.linalg.svdvals(a)
    assert knee(s) == r
    assert choose_rank("knee", shape, s) == r
    assert knee(s.float()) == r


def test_knee_geometric_decay_by_hand():
    # σ_i = 0.5^i, i = 0..4: y = (σ − σ_4)/(σ_0 − σ_4) = [1, .4667, .2, .0667, 0], x = [0, .25, .5, .75, 1],
    # d = |1 − x − y| = [0, .2833, .3, .1833, 0] -> j = 2 -> k = 2
    assert knee(S(*[0.5**i for i in range(5)])) == 2
    # σ_i = 0.7^i, i = 0..9: y = [1, .6874, .4686, .3154, .2081, .1331, .0805, .0438, .0180, 0],
    # x = i/9, d = [0, .2015, .3092, .3513, .3474, .3114, .2528, .1785, .0931, 0] -> j = 3 -> k = 3
    assert knee(S(*[0.7**i for i in range(10)])) == 3


def test_knee_ignores_scale():
    s = S(*[0.7**i for i in range(10)])
    assert knee(1e-6 * s) == knee(1e3 * s) == 3


# ----------------------------------------------------------------------------------- other rules


def test_participation_sqrt_by_hand():
    assert participation_sqrt(S(3.0, 1.0)) == 2  # 4² / 10 = 1.6 -> 2
    assert participation_sqrt(S(1.0, 1.0, 1.0, 1.0)) == 4  # 16 / 4 = 4
    assert participation_sqrt(S(2.0, 1.0, 1.0)) == 3  # 16 / 6 = 2.67 -> 3
    assert participation_sqrt(S(4.0, 1.0, 1.0, 1.0, 1.0)) == 4  # 64 / 20 = 3.2 -> 4
    assert participation_sqrt(S(1.0, 0.0, 0.0)) == 1
    assert participation_sqrt(S(0.0, 0.0)) == 1


def test_stable_rank_by_hand():
    assert stable_rank(S(2.0, 1.0, 1.0)) == 2  # 6 / 4 = 1.5 -> 2
    assert stable_rank(S(1.0, 1.0, 1.0)) == 3  # 3 / 1 = 3
    assert stable_rank(S(10.0, 1.0)) == 2  # 101 / 100 -> 2
    assert stable_rank(S(5.0, 0.0, 0.0)) == 1
    assert stable_rank(S(0.0, 0.0)) == 1


def test_entropy_by_hand():
    assert entropy(S(1.0, 1.0)) == 2  # exp(ln 2) = 2
    assert entropy(S(1.0, 1.0, 1.0, 1.0)) == 4
    # p = [.8, .1, .1]: H = .8·.22314 + .2·2.30259 = .63903, exp(H) = 1.8946 -> 2
    assert entropy(S(8.0, 1.0, 1.0)) == 2
    # p = [.5, .25, .25]: H = .5 ln 2 + .5 ln 4 = 1.0397, exp(H) = 2.828 -> 3
    assert entropy(S(2.0, 1.0, 1.0)) == 3
    assert entropy(S(0.0, 0.0)) == 1


def test_energy_by_hand():
    shape = (4, 4)
    # σ² = [9, 1], cumulative [9, 10]
    assert choose_rank("energy:0.9", shape, S(3.0, 1.0)) == 1  # 9 >= 0.9·10
    assert choose_rank("energy:0.95", shape, S(3.0, 1.0)) == 2
    # σ² = [4, 1, 1], cumulative [4, 5, 6]
    assert choose_rank("energy:0.5", shape, S(2.0, 1.0, 1.0)) == 1  # 4 >= 3
    assert choose_rank("energy:0.8", shape, S(2.0, 1.0, 1.0)) == 2  # 5 >= 4.8
    assert choose_rank(f"energy:{5 / 6!r}", shape, S(2.0, 1.0, 1.0)) == 2  # exactly 5 of 6
    assert choose_rank("energy:1", shape, S(2.0, 1.0, 1.0)) == 3


@pytest.mark.parametrize("r,shape,seed", [(5, (200, 100), 0), (3, (120, 300), 1), (10, (256, 256), 2)])
def test_gavish_donoho_recovers_the_rank(r, shape, seed):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    x = torch.randn(m, r, generator=g, dtype=torch.float64)
    y = torch.randn(r, n, generator=g, dtype=torch.float64)
    a = x @ y / 2 + torch.randn(m, n, generator=g, dtype=torch.float64)  # signal σ ≈ √(mn)/2 ≫ noise edge √m + √n
    s = torch.linalg.svdvals(a)
    assert gavish_donoho(s, shape) == r
    assert choose_rank("gavish_donoho", shape, s) == r


# ------------------------------------------------------------------------------ integers, ratios


def test_integer_and_ratio_rules_with_clipping():
    assert choose_rank(5, (10, 20)) == 5
    assert choose_rank(50, (10, 20)) == 10  # clipped to min(m, n)
    assert choose_rank(50, (3, 30, 12)) == 12  # batch: the last two dimensions
    assert choose_rank(0.5, (10, 20)) == 5
    assert choose_rank(0.25, (30, 10)) == 2  # ⌊2.5⌋
    assert choose_rank(0.01, (10, 20)) == 1  # ⌊0.1⌋ = 0 -> at least 1
    assert choose_rank(1.0, (30, 10)) == 10


def test_named_rules_clip_and_need_a_spectrum():
    with pytest.raises(ValueError, match="singular values"):
        choose_rank("knee", (4, 4))
    # a spectrum longer than min(m, n) is cut to min(m, n) first
    assert choose_rank("stable_rank", (2, 8), S(1.0, 1.0, 1.0, 1.0)) == 2


def test_check_rank_rule_accepts():
    assert check_rank_rule(1) == 1
    assert check_rank_rule(64) == 64
    assert check_rank_rule(2.0) == 2 and isinstance(check_rank_rule(2.0), int)
    assert check_rank_rule(0.5) == 0.5
    assert check_rank_rule(1.0) == 1.0 and isinstance(check_rank_rule(1.0), float)  # a ratio: full rank
    assert check_rank_rule("energy:0.9") == "energy:0.9"
    assert check_rank_rule("energy:1") == "energy:1"
    for name in NAMED:
        assert check_rank_rule(name) == name


@pytest.mark.parametrize("bad", [0, -3, 1.5, 0.0, "energy:0", "energy:x", "energy:1.5", "kne", "", True, False, None])
def test_check_rank_rule_rejects(bad):
    with pytest.raises(ValueError):
        check_rank_rule(bad)


def test_rank_param_validates_through_the_registry():
    p = rank_param()
    assert p.default == "knee" and p.validate("knee", "recipe") == "knee"
    assert p.validate(8, "recipe") == 8
    with pytest.raises(OmnimergeError, match="parameter 'rank'"):
        p.validate("kne", "recipe")
