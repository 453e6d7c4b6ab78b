"""seekr-kernels: fused kernels for SEEKR continual learning of Llama-family models."""
from .ops.attention_kl import AttentionKLLoss, attention_kl
from .ops.topk import TopK

__version__ = "0.1.0"

__all__ = ["attention_kl", "AttentionKLLoss", "TopK", "__version__"]
from .ops.attention_probs import attention_probs  # noqa: E402
__all__ += ["attention_probs"]
