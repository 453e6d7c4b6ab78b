"""The package's own runner behind the ``seekr`` command: the run config (YAML), models and
tokenizers, the run directory (checkpoints, verification, resume), the trainer loop,
evaluation, TRACE metrics, logging and the demo. It drives :mod:`seekr_kernels.seekr`.
"""
