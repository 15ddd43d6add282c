"""The benchmark suite's runner, report and comparison (`noisekernels bench`, `make bench`).

run.py runs benchmarks/ under pytest-benchmark in a mode (smoke, quick, full) and saves its JSON;
report.py turns a JSON run into BENCHMARKS.md tables and PNG plots; compare.py lists every ratio
that fell between two runs. The benchmarks themselves live in the repository's benchmarks/."""
