"""``seekr_kernels.hf``: the public path of the Hugging Face integration.

The code lives in :mod:`seekr_kernels.integrations.hf`; this module *is* that module (one
object under two names), so ``from seekr_kernels.hf import SeekrTrainer``, monkeypatching
and checkpoints that pickled ``seekr_kernels.hf.SeekrConfig`` all keep working.
"""
import sys

from .integrations import hf as _hf

sys.modules[__name__] = _hf
