"""A short digest of a torch module's weights: certificates record it and runtimes refuse another model's."""

from __future__ import annotations

import hashlib
import weakref

#: module -> (state key, digest): the last digest of each module, reused while no parameter changed.
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Values per parameter read into the state key, at evenly spaced positions.
_SAMPLE = 16


def _state(module) -> tuple:
    """What changes whenever a parameter does: its object, in-place version counter, storage, dtype, device,
    shape, and a sample of its values (an in-place edit through ``p.data`` bumps no version counter)."""
    import torch

    params = list(module.named_parameters())
    if not params:
        return ()
    with torch.no_grad():
        sample = torch.cat(
            [p.detach().reshape(-1)[:: max(1, p.numel() // _SAMPLE)][:_SAMPLE].float().cpu() for _, p in params]
        )
    return (
        *((name, id(p), p._version, p.data_ptr(), p.dtype, p.device, tuple(p.shape)) for name, p in params),
        sample.numpy().tobytes(),
    )


def weights_digest(module, *, fresh: bool = False) -> str:
    """16 hex digits of SHA-256 over every parameter's name, dtype, shape and bytes (needs torch).

    Any change of any weight changes it, on any device (the bytes are hashed on the CPU). Hashing runs at
    about 2 GB/s (0.3 s for SmolLM2-135M in float32); unless ``fresh``, it runs only when a parameter changed
    since the module's last digest: in place, replaced, moved, cast, or (through ``p.data``, which bumps no
    version counter) at one of 16 sampled positions per parameter. Pass ``fresh=True`` where the digest is
    written down for good (files, resume identities).
    """
    import torch

    state = _state(module)
    last = _LAST.get(module)
    if not fresh and last is not None and last[0] == state:
        return last[1]
    h = hashlib.sha256()
    for name, tensor in module.named_parameters():
        flat = tensor.detach().reshape(-1).contiguous()
        h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(flat.view(torch.uint8).cpu().numpy().data)
    digest = h.hexdigest()[:16]
    _LAST[module] = (state, digest)
    return digest
