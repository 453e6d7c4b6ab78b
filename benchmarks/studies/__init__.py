"""Recipe studies: whole training runs on the demo stream rather than one kernel (same runner
and ``--out`` rule as the kernel benchmarks), e.g.
``python -m benchmarks.studies.bench_demo_factors --quick --out /tmp/f``."""
