"""The verdict rules on the paper's claims, on hand-made inputs where the answer is known."""

from __future__ import annotations

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
    assert g["paired"]["ODE-M"] == {"ours": 80.0, "rival": 70.0, "orders": 1}
    assert g["paired"]["OPCM"] == {"ours": 60.0, "rival": 57.5, "orders": 2}
    # SWA shares no order with MADE-IT: missing, not compared
    assert g["missing"] == ["SWA"] and g["rivals"] == 2 and r["verdict"] == REPRODUCED
    # the closest rival is the smallest margin (OPCM, +2.5), with its order count in the evidence
    assert g["best_rival"] == "OPCM"
    assert "66.7 vs best rival OPCM 57.5 on the 2 orders it ran (MADE-IT 60.0 on those)" in r["evidence"]


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
