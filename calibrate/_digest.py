"""A short digest of a torch module's weights: certificates record it and runtimes refuse another model's."""

from __future__ import annotations

import hashlib


def weights_digest(module) -> str:
    """16 hex digits from the names and a strided sample (256 values) of every parameter (needs torch)."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in module.named_parameters():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256]
        h.update(name.encode())
        h.update(sample.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
