"""Small helpers shared across seekr_kernels (file I/O)."""
from .store import atomic_path, atomic_save_json, atomic_save_torch, atomic_write, atomic_write_bytes

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_save_json", "atomic_save_torch"]
