"""Benchmarks: ``bench/bench_<op>.py`` micro-benchmarks and the end-to-end harness
``leantune.bench.e2e`` (also ``leantune bench``), shipped with the package so that the CLI's
``bench`` subcommand works from a wheel."""
