"""Benchmarks: ``bench/bench_<op>.py`` micro-benchmarks and the end-to-end harness ``bench.e2e``.

A package only so that ``from bench.e2e import ...`` and ``python -m bench.e2e`` work from
the repository root; it is not part of the installed distribution.
"""
