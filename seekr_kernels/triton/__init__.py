"""Triton kernels, one file per kernel family. Imported lazily: triton is optional on CPU."""
