"""Benchmark factory for the CLI and the notebooks: name + group + profile → a Benchmark.

- ``toy``: the synthetic tiny-ViT suite (:mod:`madeit_core.toy`); groups ``toy-N``.
- ``zoo``: the offline benchmark built by :mod:`madeit_core.zoo` on the data mirror.
"""

from __future__ import annotations

from madeit_core.benchmark import Benchmark
from madeit_core.errors import MergeInputError


def make_benchmark(name: str, group: str, profile: str = "smoke", device: str = "cpu") -> tuple[Benchmark, list[str]]:
    """The benchmark and the group's tasks in config order."""
    if name == "toy":
        if not group.startswith("toy-") or not group[4:].isdigit():
            raise MergeInputError(f"toy benchmark groups are 'toy-N', got {group!r}")
        from madeit_core.toy import ToyBenchmark

        bench = ToyBenchmark(num_tasks=int(group[4:]), device=device)
        return bench, list(bench.tasks)
    if name == "zoo":
        from madeit_core import zoo

        return zoo.make_benchmark(group, profile=profile, device=device)
    raise MergeInputError(f"unknown benchmark {name!r} (toy, zoo)")
