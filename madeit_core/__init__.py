"""MADE-IT companion library: continual model merging with manifold-aware expert evolution.

The public entry points are re-exported here; see the README for a tour.
"""

from __future__ import annotations

__version__ = "0.1.0"

from madeit_core.errors import MergeInputError  # noqa: E402

__all__ = ["MergeInputError", "__version__"]
