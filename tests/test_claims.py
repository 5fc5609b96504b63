"""The verdict rules on the paper's claims, on hand-made inputs where the answer is known."""

from __future__ import annotations

import pytest

from madeit_core.claims import (
    NOT,
    PARTLY,
    REPRODUCED,
    affinity_wider_than_cosine,
    beats_rivals,
    generic_to_specific,
    plateau,
)


def rows(acc: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    return [{"method": m, "group": g, "ACC": a} for g, d in acc.items() for m, a in d.items()]


def test_beats_rivals() -> None:
    assert beats_rivals(rows({"g8": {"MADE-IT": 80, "OPCM": 70}, "g14": {"MADE-IT": 75, "OPCM": 60}}))[
        "verdict"] == REPRODUCED
    r = beats_rivals(rows({"g8": {"MADE-IT": 80, "OPCM": 70}, "g14": {"MADE-IT": 55, "OPCM": 60}}))
    assert r["verdict"] == PARTLY and r["groups"]["g14"]["best_rival"] == "OPCM"
    assert beats_rivals(rows({"g8": {"MADE-IT": 50, "OPCM": 70, "SWA": 60}}))["verdict"] == NOT
    # reference rows are excluded when rivals are named
    r = beats_rivals(rows({"g8": {"MADE-IT": 80, "OPCM": 70, "Fine-Tuned": 95}}), rivals=["OPCM"])
    assert r["verdict"] == REPRODUCED
    # a named rival without results is said to be missing, not silently left out
    r = beats_rivals(rows({"g8": {"MADE-IT": 80, "OPCM": 70}, "g14": {"MADE-IT": 75, "ODE-M": 60}}),
                     rivals=["OPCM", "ODE-M"])
    assert r["groups"]["g8"]["missing"] == ["ODE-M"] and r["groups"]["g14"]["missing"] == ["OPCM"]
    assert "g8: 80.0 vs best rival OPCM 70.0 (beats 1/1; no results for ODE-M)" in r["evidence"]


def test_beats_rivals_pairs_orders() -> None:
    """With per-order runs, a rival that ran fewer orders is compared on those orders only."""
    runs = ([{"method": "MADE-IT", "group": "g8", "seed": s, "ACC": a} for s, a in ((1, 60), (2, 60), (3, 80))]
            + [{"method": "ODE-M", "group": "g8", "seed": 3, "ACC": 70.0},
               {"method": "OPCM", "group": "g8", "seed": 1, "ACC": 65.0},
               {"method": "OPCM", "group": "g8", "seed": 2, "ACC": 50.0},
               {"label": "SWA", "method": "swa", "group": "g8", "seed": 9, "ACC": 99.0}])
    means = rows({"g8": {"MADE-IT": 200 / 3, "ODE-M": 70.0, "OPCM": 57.5, "SWA": 99.0}})
    # unpaired (the rule as first written): ODE-M's one order beats MADE-IT's mean over three
    assert beats_rivals(means, rivals=["ODE-M", "OPCM"])["verdict"] == NOT
    r = beats_rivals(means, rivals=["ODE-M", "OPCM", "SWA"], runs=runs)
    g = r["groups"]["g8"]
    assert g["paired"]["ODE-M"] == {"ours": 80.0, "rival": 70.0, "orders": 1, "diff_se": None}
    # OPCM: differences -5 and +10 on the two common orders, standard error 7.5
    assert g["paired"]["OPCM"] == {"ours": 60.0, "rival": 57.5, "orders": 2, "diff_se": 7.5}
    # SWA shares no order with MADE-IT: missing, not compared
    assert g["missing"] == ["SWA"] and g["rivals"] == 2 and r["verdict"] == REPRODUCED
    # the closest rival is the smallest margin (OPCM, +2.5), with its order count in the evidence
    assert g["best_rival"] == "OPCM"
    assert ("66.7 vs best rival OPCM 57.5 on the 2 orders it ran (MADE-IT 60.0 on those), paired difference "
            "+2.5 ± 15.0 (two standard errors)") in r["evidence"]


def test_generic_to_specific() -> None:
    up = {0: {"experts_mean": 1.0}, 1: {"experts_mean": 2.0}, 2: {"experts_mean": 4.0}}
    assert generic_to_specific(up)["verdict"] == REPRODUCED
    down = {0: {"experts_mean": 4.0}, 1: {"experts_mean": 2.0}, 2: {"experts_mean": 1.0}}
    assert generic_to_specific(down)["verdict"] == NOT
    assert generic_to_specific(down)["spearman"] == -1.0


def test_affinity_vs_cosine() -> None:
    aff = [i / 100 for i in range(100)]
    cos = [0.01 * ((-1) ** i) for i in range(100)]
    assert affinity_wider_than_cosine(aff, cos)["verdict"] == REPRODUCED
    assert affinity_wider_than_cosine(cos, aff)["verdict"] == NOT


def test_plateau() -> None:
    assert plateau([0.05, 0.1, 0.2, 0.5], [80, 80.5, 80.2, 70])["verdict"] == REPRODUCED
    assert plateau([0.05, 0.1, 0.2, 0.5], [70, 80.5, 80.2, 60])["verdict"] == PARTLY
    assert plateau([0.05, 0.1, 0.2], [70, 80.5, 60])["verdict"] == NOT


def test_plateau_reports_values_the_orders_cannot_tell_from_the_best() -> None:
    # best value 0.2 (mean 60); 0.1 differs by 4 points on average but by +-10 from order to order
    # (within noise); 0.5 is 10 points lower on every order (outside); 0.05 shares one order only
    best = {1: 60.0, 2: 70.0, 3: 50.0, 4: 60.0}
    noisy = {1: 66.0, 2: 56.0, 3: 56.0, 4: 46.0}
    low = {k: v - 10 for k, v in best.items()}
    values, by_order = [0.05, 0.1, 0.2, 0.5], [{1: 59.0}, noisy, best, low]
    acc = [59.0, 56.0, 60.0, 50.0]
    out = plateau(values, acc, by_order=by_order)
    assert out["verdict"] == NOT and out["plateau"] == [0.05]         # the rule's verdict is unchanged
    assert out["within_noise"] == [0.1, 0.2]
    assert "2 of 4 values are within two standard errors of the best: [0.1, 0.2]" in out["evidence"]
    assert "within_noise" not in plateau(values, acc)
    with pytest.raises(ValueError, match="3 entries for 4 values"):
        plateau(values, acc, by_order=by_order[:3])
