"""Helpers shared across seekr_kernels: :mod:`.store`, the one checksummed, atomic store
(digests, checked JSON, manifests, atomic files and directories)."""
from .store import (atomic_dir, atomic_path, atomic_save_json, atomic_save_torch, atomic_write, atomic_write_bytes,
                    check_file, check_format, check_seal, digest_bytes, digest_file, digest_json, digest_tensor,
                    digest_tensors, is_sealed, read_json, seal, verify_dir, write_json, write_manifest)

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_save_json", "atomic_save_torch", "atomic_dir",
           "digest_bytes", "digest_file", "digest_tensor", "digest_tensors", "digest_json", "seal", "is_sealed",
           "check_seal", "check_format", "read_json", "write_json", "write_manifest", "verify_dir", "check_file"]
