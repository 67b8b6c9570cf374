"""A synthetic layer cache with a known, documented generative story (no model needed).

Used by the demo, the benchmarks and the tests: it behaves like a real early-exit cache (agreement with
the last layer rises with depth, confidences predict agreement but imperfectly, predictions sometimes
flip back) while being fast to generate and fully determined by its seed.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from calibrate._cache_checks import _vocab_size_iv
from calibrate._validation import finite_positive, int_at_least, seed_iv
from calibrate.cache import LayerCache, _from_arrays
from measures.confidence import from_topk, state_saturation

__all__ = ["synthetic_cache"]

#: Tokens per generation block (bounds the temporaries). Each block draws from its own child seed;
#: changing this constant changes the generated data.
_BLOCK = 4096
#: Common words first: token ids are in Zipf frequency order.
_WORDS = (
    " the", ".", ",", " of", " and", " to", " a", " in", " is", " that", " it", " for", " was", " on",
    " with", " as", " be", " at", " by", " this", " had", " not", " are", " but", " from", " or", " have",
    " an", " they", " which", " one", " you", " were", " her", " all", " she", " there", " would", " their",
    " we", " him", " been", " has", " when", " who", " will", " more", " no", " if", " out", " so", " said",
    " what", " up", " its", " about", " into", " than", " them", " can", " only", " other", " new", " some",
    " could", " time", " these", " two", " may", " then", " do", " first", " any", " my", " now", " such",
    " like", " our", " over", " man", " me", " even", " most", " made", " after", " also", " did", " many",
)
# Generative constants (see the docstring of synthetic_cache).
_KAPPA = 8.0  # slope of the mean margin in depth
_SIGMA = 1.5  # scale of the margin noise at layer 1 (shrinks as sqrt(1 - i/L))
_RHO = 0.7  # layer-to-layer correlation of the margin noise
_SEQ_SHIFT = 0.5  # sd of the per-sequence shift of the resolution depth (logit scale)
_P_SUBSTITUTE, _P_DELETE = 0.08, 0.04  # reference edits per token


def synthetic_cache(
    n_sequences: int = 200,
    *,
    n_layers: int = 12,
    max_tokens: int = 32,
    min_tokens: int = 8,
    vocab_size: int = 500,
    top_k: int = 4,
    hidden_size: int = 16,
    store_hidden: bool = True,
    references: bool = True,
    difficulty: float = 1.0,
    seed: int = 0,
    first_id: int = 0,
) -> LayerCache:
    """Generate a layer cache from a simple model of how predictions settle with depth.

    Parameters
    ----------
    n_sequences : int, default=200
        Number of sequences (>= 1).
    n_layers : int, default=12
        Number of layers ``L`` (>= 1).
    max_tokens, min_tokens : int, default=32, 8
        Each sequence has a uniform number of generated tokens in ``[min_tokens, max_tokens]``
        (``1 <= min_tokens <= max_tokens``).
    vocab_size : int, default=500
        Vocabulary size ``V`` (>= max(top_k, 3), <= 2**31 - 1 as in any cache); the generator holds a word per
        token id, so memory grows with ``V`` (about 90 bytes per id).
    top_k : int, default=4
        Predictions stored per layer (>= 1).
    hidden_size : int, default=16
        Size ``d`` of the simulated hidden states (>= 1).
    store_hidden : bool, default=True
        Store the hidden states (float16, ``2 T L d`` bytes). Without them ``state_saturation`` is
        still precomputed, from the same draws (see Notes).
    references : bool, default=True
        Give each sequence a reference text (the full output with a few word edits).
    difficulty : float, default=1.0
        Scales how late tokens settle (> 0): larger means later exits are needed.
    seed : int, default=0
        Non-negative seed; the same arguments and seed give the same cache (same checksum).
    first_id : int, default=0
        Sequence ids are ``"synthetic-{first_id}"``, ``"synthetic-{first_id + 1}"``, ...: give each piece of
        a cache generated piece by piece (the shards of :mod:`calibrate.shards`) its own ids.

    Returns
    -------
    LayerCache
        With ``full_tokens``, ``topk_ids``, ``topk_logprobs``, the precomputed ``softmax_gap``,
        ``softmax_max``, ``entropy`` and ``state_saturation``, optionally ``hidden``; a vocab of
        word-like strings (``" the"``, ``","``, ``" w317"``) so outputs decode to text; and
        ``meta["generation"]["max_new_tokens"] == max_tokens``.

    Raises
    ------
    TypeError
        When an argument has the wrong type (a float count, a str difficulty, a float seed); the message names it.
    ValueError
        When an argument is out of range; the message names it.

    Notes
    -----
    The generative story, for token ``t`` of sequence ``s`` and layer ``i = 1..L`` (``x_i = i / L``):

    1. **Output.** The full model's token ``y_t`` is drawn from a Zipf law over the vocabulary; the
       token also gets two or more distinct *distractors* from the same law (the wrong guesses that
       shallow layers make).
    2. **Difficulty.** Each token has a latent resolution depth
       ``r_t = sigmoid(logit(B_t) + u_s)`` with ``B_t ~ Beta(2 * difficulty, 2)`` and a per-sequence
       shift ``u_s ~ N(0, 0.5^2)`` (some sequences are harder throughout).
    3. **Margin.** The margin of ``y_t`` over its best distractor at layer ``i`` is
       ``m_ti = 8 (x_i - r_t) + 1.5 sqrt(1 - x_i) e_ti``, where ``e_t.`` is a stationary AR(1) process
       over layers with correlation 0.7. Layer ``i`` agrees with the full model iff ``m_ti > 0``; at
       ``i = L`` the margin is positive, so agreement rises with depth to 1 at the last layer, while the
       noise makes a layer's top-1 flip back and forth (about one token in eight loses the right
       answer again after having it).
    4. **Top-k.** Ranks are the token and its distractors ``c1, c2, ...``: ``y_t c1 c2 c3 ...`` when
       the layer agrees, else ``c1 y_t c2 c3 ...`` (probability 3/4) or ``c2 y_t c1 c3 ...``. Logits
       are ``0, -D, -D - g, -D - 2g, ...`` with gap ``D_ti = exp(0.35 m_ti + 0.8 z_ti + 0.3)``,
       ``z_ti ~ N(0, 1)`` independent of the margin (so confidence predicts agreement imperfectly) and
       ``g = 0.5 + x_i``; each of the other ``V - k`` tokens gets the logit of rank ``k`` minus
       ``tau_ti = max(0.1, log(V - k) (0.1 + 1.1 x_i) + 0.5 + 0.25 m_ti)`` (a flat tail: shallow
       layers are high-entropy). Log-probabilities are these logits minus their exact log-normaliser.
    5. **Hidden states.** The residual stream starts from a random unit vector ``h_0`` and adds one
       update per layer, ``h_i = h_{i-1} + s_ti w_ti``, with
       ``w_ti = (g_ti h_{i-1} / |h_{i-1}| + sqrt(d - 1) u_ti) / sqrt(d)``, ``g_ti ~ N(0, 1)`` and
       ``u_ti`` a uniformly random unit vector orthogonal to ``h_{i-1}`` (an isotropic ``N(0, I_d / d)``
       step with its orthogonal length fixed at its mean). The step is large while the token is
       unresolved and small after: ``s_ti = 0.4 + 1.2 sigmoid(-0.5 m_ti)``. The state saturation
       ``cos(h_i, h_{i-1})`` therefore rises with depth and with the margin, a weaker signal than the
       softmax measures, as in CALM.
    6. **Measures.** ``softmax_gap``, ``softmax_max`` and ``entropy`` are computed from the stored
       top-k log-probabilities by :func:`measures.confidence.from_topk` (the flat tail makes its
       entropy approximation exact here); ``state_saturation`` by
       :func:`measures.confidence.state_saturation` on the stored float16 hidden states. Without
       ``store_hidden`` the vectors are never built: the cosine follows from the scalars alone,
       ``cos = (|h_{i-1}| + s g / sqrt(d)) / |h_i|`` with
       ``|h_i|^2 = |h_{i-1}|^2 + 2 s |h_{i-1}| g / sqrt(d) + s^2 (g^2 + d - 1) / d``, so both settings
       give the same cache up to the float16 rounding of the hidden states.
    7. **References.** The full output with each token substituted (probability 0.08, by a Zipf draw)
       or deleted (probability 0.04).

    Standard normals come from a 4,096-level quantile table indexed by random bits (fast, and exact
    up to that resolution). Generation runs in blocks of 4,096 tokens, each with its own child seed,
    in float32; a cache of ``T`` tokens and ``L`` layers takes about ``T * L * (16 + 8 k)`` bytes,
    plus ``2 T L d`` with ``store_hidden``.

    Examples
    --------
    >>> from calibrate.synthetic import synthetic_cache
    >>> cache = synthetic_cache(50, n_layers=6, seed=0)
    >>> cache.n_sequences, cache.n_layers, cache.top_k
    (50, 6, 4)
    >>> agree = cache.arrays["topk_ids"][:, :, 0] == cache.arrays["full_tokens"][:, None]
    >>> bool(agree[:, -1].all()), bool(agree[:, 0].mean() < agree[:, 3].mean())
    (True, True)
    >>> first = cache.sequences.iloc[0]
    >>> cache.decode(first["output_ids"]) == first["output"]
    True
    """
    p = _synthetic_cache_iv(
        n_sequences, n_layers, max_tokens, min_tokens, vocab_size, top_k, hidden_size, store_hidden,
        references, difficulty, seed,
    )
    n, L, V, k, d = p["n_sequences"], p["n_layers"], p["vocab_size"], p["top_k"], p["hidden_size"]
    first_id = int_at_least(first_id, "first_id", 0)  # a Python int: np.int8(125) + 3 wrapped to -128
    root = np.random.SeedSequence(p["seed"])
    seq_ss, ref_ss, block_root = root.spawn(3)
    rng = np.random.default_rng(seq_ss)

    # Sequences: lengths, per-sequence difficulty shift.
    lengths = rng.integers(p["min_tokens"], p["max_tokens"] + 1, size=n).astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n_tokens = int(offsets[-1])
    seq_shift = rng.normal(0.0, _SEQ_SHIFT, size=n)

    # Tokens: full-model output, distractors (distinct from the output and each other), resolution depth.
    zipf_cdf = _zipf_cdf(V)
    n_cand = max(k, 3)
    cand = np.empty((n_tokens, n_cand), dtype=np.int32)
    cand[:, 0] = _zipf(rng, zipf_cdf, n_tokens)
    for j in range(1, n_cand):
        cand[:, j] = _zipf(rng, zipf_cdf, n_tokens)
        clash = np.any(cand[:, j : j + 1] == cand[:, :j], axis=1)
        while clash.any():
            rows = np.flatnonzero(clash)
            cand[rows, j] = rng.integers(0, V, size=rows.size)
            clash[rows] = np.any(cand[rows, j : j + 1] == cand[rows, :j], axis=1)
    # capped: 2 * 1e308 overflows to inf (a shape of 1e300 already gives beta = 1 - 1e-6 after the clip)
    beta = np.clip(rng.beta(min(2.0 * p["difficulty"], 1e300), 2.0, size=n_tokens), 1e-6, 1 - 1e-6)
    resolve = special.expit(special.logit(beta) + np.repeat(seq_shift, lengths)).astype(np.float32)

    # Token-major outputs, filled block by block.
    out = {
        "topk_ids": np.empty((n_tokens, L, k), dtype=np.int32),
        "topk_logprobs": np.empty((n_tokens, L, k), dtype=np.float32),
        "softmax_gap": np.empty((n_tokens, L), dtype=np.float32),
        "softmax_max": np.empty((n_tokens, L), dtype=np.float32),
        "entropy": np.empty((n_tokens, L), dtype=np.float32),
        "state_saturation": np.empty((n_tokens, L), dtype=np.float32),
    }
    if p["store_hidden"]:
        out["hidden"] = np.empty((n_tokens, L, d), dtype=np.float16)
    normal, ws = _normal_table(), _Workspace(L, min(_BLOCK, n_tokens))
    block_seeds = block_root.spawn(-(-n_tokens // _BLOCK))
    for j, lo in enumerate(range(0, n_tokens, _BLOCK)):
        hi = min(n_tokens, lo + _BLOCK)
        _fill_block(out, lo, hi, cand[lo:hi], resolve[lo:hi], block_seeds[j], normal, ws, L, V, k, d)

    vocab = _vocab(V)
    full = np.ascontiguousarray(cand[:, 0])
    refs = _references(full, offsets, vocab, zipf_cdf, ref_ss) if p["references"] else None
    scores = {name: out.pop(name) for name in ("softmax_gap", "softmax_max", "entropy", "state_saturation")}
    return _from_arrays(
        copy=False,
        full_tokens=full,
        topk_ids=out["topk_ids"],
        topk_logprobs=out["topk_logprobs"],
        hidden=out.get("hidden"),
        scores=scores,
        offsets=offsets,
        prompts=[f"Synthetic prompt {s}:" for s in range(n)],
        references=refs,
        ids=[f"synthetic-{first_id + s}" for s in range(n)],
        vocab=vocab,
        vocab_size=V,
        model="synthetic",
        meta={
            "tokenizer": "synthetic-words",
            "generation": {"max_new_tokens": p["max_tokens"], "min_new_tokens": p["min_tokens"], "do_sample": False},
            "synthetic": {key: p[key] for key in sorted(p)},
        },
    )


def _synthetic_cache_iv(
    n_sequences, n_layers, max_tokens, min_tokens, vocab_size, top_k, hidden_size, store_hidden, references,
    difficulty, seed,
) -> dict:
    p = {
        "n_sequences": int_at_least(n_sequences, "n_sequences"),
        "n_layers": int_at_least(n_layers, "n_layers"),
        "max_tokens": int_at_least(max_tokens, "max_tokens"),
        "min_tokens": int_at_least(min_tokens, "min_tokens"),
        "top_k": int_at_least(top_k, "top_k"),
        "hidden_size": int_at_least(hidden_size, "hidden_size"),
        "seed": seed_iv(seed),
    }
    if p["min_tokens"] > p["max_tokens"]:
        raise ValueError(f"min_tokens must be <= max_tokens={p['max_tokens']}, got {p['min_tokens']}")
    p["vocab_size"] = _vocab_size_iv(int_at_least(vocab_size, "vocab_size", max(p["top_k"], 3)))
    for name, value in (("store_hidden", store_hidden), ("references", references)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {value!r}")
        p[name] = bool(value)
    p["difficulty"] = finite_positive(difficulty, "difficulty")
    return p


def _uint16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform random uint16 of the given shape, from the raw 64-bit stream (fast)."""
    n = int(np.prod(shape))
    raw = rng.bit_generator.random_raw(-(-n // 4)).astype("<u8", copy=False)
    return raw.view("<u2")[:n].reshape(shape)


def _normal_table() -> np.ndarray:
    """4,096 equiprobable quantiles of N(0, 1) (small enough to stay in the L1 cache)."""
    return special.ndtri((np.arange(1 << 12) + 0.5) / (1 << 12)).astype(np.float32)


class _Workspace:
    """Buffers reused across blocks, layer-major (L, _BLOCK): in-place ops avoid page faults."""

    def __init__(self, L: int, block: int) -> None:
        names = ("eps", "zeta", "g", "margin", "gap", "below", "mass", "tmp", "step", "sat")
        self.f = {name: np.empty((L, block), dtype=np.float32) for name in names}
        self.b = {name: np.empty((L, block), dtype=bool) for name in ("agree", "main")}
        self.u16 = np.empty((L, block), dtype=np.uint16)
        self.i32 = np.empty((L, block), dtype=np.int32)

    def get(self, b: int):
        """Views of the buffers for a block of ``b`` tokens."""
        f = {name: a[:, :b] for name, a in self.f.items()}
        return f, {name: a[:, :b] for name, a in self.b.items()}, self.u16[:, :b], self.i32[:, :b]


def _fill_block(out, lo, hi, cand, resolve, seed, normal, ws, L, V, k, d) -> None:
    """Generate tokens [lo, hi) into ``out``. Block arrays are layer-major, (L, B), for the loops."""
    rng = np.random.default_rng(seed)
    b = hi - lo
    f, flags, u16, i32 = ws.get(b)
    eps, zeta, g, margin = f["eps"], f["zeta"], f["g"], f["margin"]
    gap, below, mass, tmp = f["gap"], f["below"], f["mass"], f["tmp"]
    agree, main = flags["agree"], flags["main"]
    x = (np.arange(1, L + 1, dtype=np.float32) / L)[:, None]  # (L, 1) relative depth
    bits = _uint16(rng, (3, L, b))
    np.bitwise_and(bits[1], 3, out=u16)
    np.not_equal(u16, 0, out=main)  # P = 3/4: the main distractor leads (low bits, unused by zeta)
    for buf, i in ((eps, 0), (zeta, 1), (g, 2)):
        np.right_shift(bits[i], 4, out=u16)
        np.take(normal, u16, out=buf)  # (L, B) standard normals from the top 12 bits

    # 3. Margin with stationary AR(1) noise over layers; the last layer always agrees.
    innov = np.float32(np.sqrt(1.0 - _RHO**2))
    for i in range(1, L):
        eps[i] *= innov
        eps[i] += _RHO * eps[i - 1]
    np.subtract(x, resolve, out=margin)
    margin *= _KAPPA
    eps *= _SIGMA * np.sqrt(1.0 - x)
    margin += eps  # (L, B)
    np.greater(margin, 0.0, out=agree)
    agree[-1] = True

    # 4. Top-k ids. Rank orders: agree -> c0 c1 c2 c3 ..; main -> c1 c0 c2 c3 ..; else c2 c0 c1 c3 ..
    c0, c1, c2 = cand[:, 0], cand[:, 1], cand[:, 2]  # (B,)
    ids = out["topk_ids"][lo:hi]  # (B, L, k) view
    np.copyto(i32, c2)
    np.copyto(i32, c1, where=main)
    np.copyto(i32, c0, where=agree)
    np.copyto(ids[:, :, 0], i32.T)
    if k > 1:
        np.copyto(i32, c0)
        np.copyto(i32, c1, where=agree)
        np.copyto(ids[:, :, 1], i32.T)
    if k > 2:
        np.copyto(i32, c1)
        np.copyto(i32, c2, where=agree | main)
        np.copyto(ids[:, :, 2], i32.T)
    if k > 3:
        ids[:, :, 3:] = cand[:, None, 3:k]

    # 4. Log-probabilities: logits 0, -D, -D - g, ... and a flat tail over the other V - k tokens.
    np.multiply(margin, 0.35, out=gap)
    zeta *= 0.8
    gap += zeta
    gap += 0.3
    np.exp(gap, out=gap)  # (L, B) logit gap D between ranks 1 and 2
    np.negative(gap, out=below)
    np.exp(below, out=below)  # e^{l_2}
    step = 0.5 + x  # (L, 1) spacing of the lower ranks
    rank_factor = np.exp(-np.arange(k - 1, dtype=np.float32) * step)  # (L, k - 1): e^{l_j - l_2}
    np.multiply(below, rank_factor.sum(axis=1, keepdims=True), out=mass)
    mass += 1.0
    if V > k:
        np.multiply(margin, 0.25, out=tmp)
        tmp += np.float32(np.log(V - k)) * (0.1 + 1.1 * x) + 0.5
        np.maximum(tmp, 0.1, out=tmp)  # tail depth tau below rank k
        np.negative(tmp, out=tmp)
        np.exp(tmp, out=tmp)
        tmp *= below if k > 1 else 1.0
        tmp *= (V - k) * (rank_factor[:, -1:] if k > 1 else 1.0)
        mass += tmp
    log_mass = np.log(mass, out=mass)  # (L, B) log-normaliser
    lp = out["topk_logprobs"][lo:hi]  # (B, L, k) view
    np.negative(log_mass.T, out=lp[:, :, 0])
    for j in range(1, k):
        np.add(gap, log_mass, out=tmp)
        tmp += (j - 1) * step
        np.negative(tmp.T, out=lp[:, :, j])
    np.minimum(lp, 0.0, out=lp)
    for name, values in from_topk(lp, V).items():
        out[name][lo:hi] = values

    # 5. Hidden-state saturation through the scalars of the residual-stream recursion.
    step_size = f["step"]
    np.multiply(margin, 0.5, out=step_size)
    np.exp(step_size, out=step_size)
    step_size += 1.0
    np.reciprocal(step_size, out=step_size)
    step_size *= 1.2
    step_size += 0.4  # (L, B) 0.4 + 1.2 sigmoid(-0.5 m)
    if "hidden" in out:
        hidden = _hidden_states(rng, step_size, g, d)  # (B, L, d) float16
        out["hidden"][lo:hi] = hidden
        out["state_saturation"][lo:hi] = state_saturation(hidden)
        return
    along, w2, sat = below, tmp, f["sat"]  # reuse buffers
    np.multiply(g, np.float32(1.0 / np.sqrt(d)), out=along)  # <h_{i-1}, w_i> / |h_{i-1}|
    np.multiply(g, g, out=w2)
    w2 += np.float32(d - 1)
    w2 *= np.float32(1.0 / d)  # |w_i|^2
    sat[0] = 0.0  # layer 1 has no predecessor
    norm = np.ones(b, dtype=np.float32)  # |h_{i-1}|
    for i in range(L):
        s = step_size[i]
        dot = norm * (norm + s * along[i])  # <h_{i-1}, h_i>
        new = np.sqrt(np.maximum(norm * norm + s * (2 * norm * along[i] + s * w2[i]), 0))  # |h_i| (d=1: a square)
        if i > 0:
            denom = norm * new
            sat[i] = 0.0  # a zero vector (d=1: h may cross 0) has saturation 0, as state_saturation gives it
            np.divide(dot, denom, out=sat[i], where=denom > 0)
        norm = new
    np.clip(sat, -1.0, 1.0, out=sat)
    np.copyto(out["state_saturation"][lo:hi], sat.T)


def _hidden_states(rng, step_size, g, d) -> np.ndarray:
    """Residual stream (B, L, d) float16 whose updates have the projections ``g`` described above."""
    vec_rng = np.random.default_rng(rng.integers(0, 2**63))
    L, b = step_size.shape
    h = vec_rng.standard_normal((b, d), dtype=np.float32)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    hidden = np.empty((b, L, d), dtype=np.float16)
    ortho_len = np.float32(np.sqrt(d - 1))
    for i in range(L):
        unit = h / np.linalg.norm(h, axis=1, keepdims=True)
        u = vec_rng.standard_normal((b, d), dtype=np.float32)
        u -= np.sum(u * unit, axis=1, keepdims=True) * unit  # orthogonal to h
        u_len = np.linalg.norm(u, axis=1, keepdims=True)
        u = np.divide(u, u_len, out=np.zeros_like(u), where=u_len > 0)
        update = (g[i][:, None] * unit + ortho_len * u) / np.float32(np.sqrt(d))  # (B, d)
        h = h + step_size[i][:, None] * update
        hidden[:, i] = h
    return hidden


def _zipf_cdf(V: int) -> np.ndarray:
    weights = 1.0 / (np.arange(V) + 2.7) ** 1.05
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _zipf(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(size)), cdf.size - 1).astype(np.int32)


def _vocab(V: int) -> list[str]:
    words = list(_WORDS[:V])
    return words + [f" w{i}" for i in range(len(words), V)]


def _references(full, offsets, vocab, zipf_cdf, seed_seq) -> list[str]:
    """Full outputs with seeded word substitutions and deletions."""
    rng = np.random.default_rng(seed_seq)
    u = rng.random(full.size)
    tokens = np.where(u < _P_SUBSTITUTE, _zipf(rng, zipf_cdf, full.size), full)
    keep = u >= _P_SUBSTITUTE + _P_DELETE
    keep |= u < _P_SUBSTITUTE  # substituted tokens stay
    pieces = np.array(vocab, dtype=object)[tokens]
    kept = np.zeros(offsets.size, dtype=np.int64)
    np.cumsum(np.add.reduceat(keep.astype(np.int64), offsets[:-1]), out=kept[1:])
    pieces = pieces[keep]
    return ["".join(pieces[kept[s] : kept[s + 1]]) for s in range(offsets.size - 1)]
