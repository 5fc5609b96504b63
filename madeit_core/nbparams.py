"""The notebooks' parameters for each profile (what ``scripts/run_notebooks.py`` injects).

Every notebook has one ``parameters`` cell with the common keys of :data:`COMMON_KEYS` and, for
some, extra keys (:data:`NOTEBOOK_EXTRAS`). A *profile* names the sizes; the *benchmark* the
task suite: ``toy`` (synthetic, seconds; what CI runs today) or ``zoo`` (the offline benchmark on
EfficientNet-Lite0: ``smoke`` groups for CI-sized builds, ``offline`` groups for the reference).

``seeds`` are the order seeds of the protocol (run r uses seed 42 + r; the paper's ten orders
are seeds 42..51).
"""

from __future__ import annotations

import copy
from typing import Any

from madeit_core.bookplan import TABLE1_METHODS
from madeit_core.errors import MergeInputError

#: The notebooks of the book, in the order the runner executes them.
NOTEBOOKS: tuple[str, ...] = ("table1_acc_bwt", "tables4_6_per_task", "table2_affinity_cosine", "fig2_allocation",
                              "fig3_experts_kept", "fig4_score_densities", "fig5_task_heatmaps", "fig6_sensitivity",
                              "routing_accuracy", "ablations", "performance")

COMMON_KEYS: tuple[str, ...] = ("profile", "benchmark", "groups", "seeds", "methods", "device", "results_dir",
                                "reference_dir")

PAPER_SEEDS: list[int] = list(range(42, 52))

_COMMON = {"device": "auto", "results_dir": "runs/notebooks", "reference_dir": "results/reference",
           "methods": list(TABLE1_METHODS)}

#: (profile, benchmark) → common parameters and sweep sizes.
PARAMETER_SETS: dict[tuple[str, str], dict[str, Any]] = {
    ("smoke", "toy"): {**_COMMON, "profile": "smoke", "benchmark": "toy", "groups": ["toy-4", "toy-6"],
                       "seeds": [42, 43], "rho_values": [0.05, 0.1, 0.3, 1.0], "lambda_values": [0.0, 1.0, 2.0]},
    ("smoke", "zoo"): {**_COMMON, "profile": "smoke", "benchmark": "zoo", "groups": ["smoke-4", "smoke-8"],
                       "seeds": [42, 43], "rho_values": [0.05, 0.1, 0.3, 1.0], "lambda_values": [0.0, 1.0, 2.0]},
    ("offline", "zoo"): {**_COMMON, "profile": "offline", "benchmark": "zoo",
                         "groups": ["offline-8", "offline-14", "offline-20"], "seeds": PAPER_SEEDS,
                         "rho_values": [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
                         "lambda_values": [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]},
}

#: The benchmark a profile uses when none is named.
DEFAULT_BENCHMARK: dict[str, str] = {"smoke": "toy", "offline": "zoo"}

#: Notebook → its extra parameter keys (taken from the parameter set).
NOTEBOOK_EXTRAS: dict[str, tuple[str, ...]] = {"fig6_sensitivity": ("rho_values", "lambda_values")}

#: The profile whose committed results every notebook shows beside the build's own.
REFERENCE_PROFILE = "offline"


def parameter_set(profile: str, benchmark: str | None = None) -> dict[str, Any]:
    bench = benchmark or DEFAULT_BENCHMARK.get(profile)
    if (profile, bench) not in PARAMETER_SETS:
        known = ", ".join(f"{p}/{b}" for p, b in PARAMETER_SETS)
        raise MergeInputError(f"no notebook parameters for profile {profile!r} with benchmark {bench!r}; "
                              f"known: {known}")
    return copy.deepcopy(PARAMETER_SETS[(profile, bench)])


def notebook_parameters(name: str, profile: str, benchmark: str | None = None) -> dict[str, Any]:
    """The parameters injected into notebook ``name`` (common keys plus its extras)."""
    if name not in NOTEBOOKS:
        raise MergeInputError(f"unknown notebook {name!r}; known: {', '.join(NOTEBOOKS)}")
    full = parameter_set(profile, benchmark)
    keys = COMMON_KEYS + NOTEBOOK_EXTRAS.get(name, ())
    return {k: full[k] for k in keys}


def collect(namespace: dict[str, Any], name: str) -> dict[str, Any]:
    """The parameters of notebook ``name`` read back from its namespace (``globals()``)."""
    keys = COMMON_KEYS + NOTEBOOK_EXTRAS.get(name, ())
    missing = [k for k in keys if k not in namespace]
    if missing:
        raise MergeInputError(f"notebook {name}: parameters {missing} are not defined")
    return {k: namespace[k] for k in keys}


__all__ = ["COMMON_KEYS", "DEFAULT_BENCHMARK", "NOTEBOOKS", "NOTEBOOK_EXTRAS", "PAPER_SEEDS", "PARAMETER_SETS",
           "REFERENCE_PROFILE", "collect", "notebook_parameters", "parameter_set"]
