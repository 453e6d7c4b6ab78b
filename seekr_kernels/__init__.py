"""seekr-kernels: fused kernels for SEEKR continual learning of Llama-family models."""
from .ops.attention_kl import AttentionKLLoss, attention_kl
from .ops.topk import TopK

__version__ = "0.1.0"

__all__ = ["attention_kl", "AttentionKLLoss", "TopK", "__version__"]
from .ops.attention_probs import attention_probs  # noqa: E402
__all__ += ["attention_probs"]
from .ops.attention_sqdiff import attention_sqdiff  # noqa: E402
from .continual.selection import batch_heads, select_heads  # noqa: E402
from .continual.importance import (Importance, measure_forgettability, measure_sensitivity,  # noqa: E402
                                   sensitivity_loss)
__all__ += ["attention_sqdiff", "select_heads", "batch_heads", "measure_sensitivity", "measure_forgettability",
            "sensitivity_loss", "Importance"]
from .continual.replay import ReplayMemory, ReplaySample, ReplayTask  # noqa: E402
__all__ += ["ReplayMemory", "ReplaySample", "ReplayTask"]
from .llama import capture_attention, distill_attention, observe_attention, patch_llama, unpatch_llama  # noqa: E402
__all__ += ["patch_llama", "unpatch_llama", "distill_attention", "capture_attention", "observe_attention"]
from .ops.logits_kl import LogitsKLLoss, logits_kl  # noqa: E402
from .cache import TeacherCache, TeacherCacheError  # noqa: E402
__all__ += ["logits_kl", "LogitsKLLoss", "TeacherCache", "TeacherCacheError"]
