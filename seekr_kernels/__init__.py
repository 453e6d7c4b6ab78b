"""seekr-kernels: fused kernels for SEEKR continual learning of Llama-family models.

Layers of the package, bottom up: Triton / C++ / CUDA kernels (``triton/``, ``csrc/``), the
ops that wrap them (``ops/``: functional API + autograd + backend dispatch), the model
integration (``llama``), the method (``seekr/``), the loops that drive it (``run/``, ``integrations/hf``) and the command (``cli``).
"""
# Ops
from .ops.attention_kl import AttentionKLLoss, attention_kl
from .ops.attention_probs import attention_probs
from .ops.attention_sqdiff import attention_sqdiff
from .ops.logits_kl import LogitsKLLoss, logits_kl
from .ops.linear_logits_kl import LinearLogitsKLLoss, linear_logits_kl
from .ops.teachers import SampledTeacher, TopK
from .cache import TeacherCache, TeacherCacheError
# Model integration
from .llama import capture_attention, distill_attention, observe_attention, patch_llama, unpatch_llama
# Algorithm
from .seekr.importance import Importance, measure_forgettability, measure_sensitivity, sensitivity_loss
from .seekr.memory import ReplayDataset, ReplayMemory, ReplaySample, ReplayTask
from .seekr.selection import batch_heads, select_heads
from .seekr.config import RecipeConfig
from .run.config import RunConfig
from .seekr.distributed import DistributedHooks
from .seekr.snapshot import PreTaskWeights
from .seekr.stream import ReplaySchedule
from .seekr.recipe import SeekrRecipe
from .run.trainer import ContinualTrainer, train

from ._version import __version__

__all__ = [
    "attention_kl", "AttentionKLLoss", "attention_probs", "attention_sqdiff", "logits_kl",
    "LogitsKLLoss", "linear_logits_kl", "LinearLogitsKLLoss", "TopK", "SampledTeacher", "TeacherCache", "TeacherCacheError",
    "patch_llama", "unpatch_llama", "distill_attention", "capture_attention", "observe_attention",
    "measure_sensitivity", "measure_forgettability", "sensitivity_loss", "Importance",
    "select_heads", "batch_heads", "ReplayMemory", "ReplaySample", "ReplayTask", "ReplayDataset",
    "SeekrRecipe", "RecipeConfig", "DistributedHooks", "PreTaskWeights", "ReplaySchedule",
    "RunConfig", "ContinualTrainer", "train", "__version__",
]
