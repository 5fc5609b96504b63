"""Benchmark factory for the CLI and the notebooks: name + group + profile → a Benchmark.

- ``toy``: the synthetic tiny-ViT suite (:mod:`madeit_core.toy`); groups ``toy-N``.
- ``zoo``: the offline benchmark built by :mod:`madeit_core.zoo` on the data mirror.
- ``clip``: the paper's CLIP setting (:mod:`madeit_core.clip_benchmark`); groups ``clip-8``,
  ``clip-14``, ``clip-20`` (profile ``clip``/``clip-b32``, ``clip-b16``, ``clip-l14``: the real
  models from the hub; profile ``smoke``: a tiny random CLIP, offline) and ``clip-tiny-N``.
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
    if name == "clip":
        from madeit_core.clip_benchmark import make_clip_benchmark

        return make_clip_benchmark(group, profile=profile, device=device)
    raise MergeInputError(f"unknown benchmark {name!r} (toy, zoo, clip)")
