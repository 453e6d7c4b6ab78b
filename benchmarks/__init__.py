"""Benchmarks of the kernels (``bench_*.py``), recipe studies (``studies/``) and their
committed results (``results/``). Run each as a module from the repository root, e.g.
``python -m benchmarks.bench_attention_kl --quick --out /tmp/x``; the shared runner is
``benchmarks/common.py``."""
