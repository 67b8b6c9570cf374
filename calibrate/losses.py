"""Loss tables: one loss in ``[0, 1]`` per calibration example and tested threshold.

A :class:`LossTable` is what the risk control consumes. Its columns follow the thresholds from safest to
fastest. Builders:

* :func:`proxy_losses` -- from a layer cache alone, by teacher-forced simulation along the full-model
  output (``mode="proxy"``);
* :func:`user_losses` -- from losses the caller computed with any generator (``mode="user"``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from calibrate._frozen import Rebuilt
from calibrate._validation import bounded_array, exit_layers_iv, int_at_least
from calibrate.certificate import MODES
from calibrate.exits import Decay, _lambdas_iv, disagreement_counts, early_tokens, exit_layers
from measures._arrays import as_numpy

if TYPE_CHECKING:
    from calibrate.cache import LayerCache

__all__ = ["LossTable", "CONSISTENCIES", "proxy_losses", "tokenizer_decode", "user_losses"]

#: Consistency losses: token-level ones need only token ids, textual ones compare decoded text with the
#: full-model output, ``risk_*`` ones compare both outputs with the reference:
#: ``max(0, R(early, ref) - R(full, ref))`` with ``R = 1 - metric``.
CONSISTENCIES = (
    "token",
    "sequence",
    "rouge_l",
    "bleu",
    "token_f1",
    "risk_rouge_l",
    "risk_bleu",
    "risk_token_f1",
)
#: The consistencies that compare token ids (no text to decode).
_TOKEN_LEVEL = ("token", "sequence")
_SEQUENCES_PER_BATCH = 256


@dataclass(frozen=True, eq=False)
class LossTable(Rebuilt):
    """Per-example losses for each tested threshold.

    Attributes
    ----------
    losses : ndarray of float64, shape (n_examples, n_lambdas)
        Losses in ``[0, 1]`` (0 = as good as the full model).
    lambdas : ndarray of float64, shape (n_lambdas,)
        Thresholds, strictly decreasing (safest first).
    mode : {"proxy", "decoded", "user"}
        Where the losses come from (see :data:`calibrate.certificate.MODES`).
    consistency : str or None
        Name of the loss.
    avg_layers : ndarray of float64, shape (n_lambdas,), or None
        Token-averaged exit layer per threshold, in ``[1, n_layers]``; NaN where it does not apply.
    n_layers : int or None
        Number of layers of the model.
    decay : Decay or None
        The decaying threshold the exits were simulated with (:func:`proxy_losses`); a certificate from the
        table records it, as ``lambda`` means another threshold with it (a ``lambda > 1`` still exits).

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.losses import LossTable
    >>> table = LossTable(np.array([[0.0, 0.0, 1.0], [0.0, 0.5, 1.0]]), lambdas=[0.9, 0.5, 0.1])
    >>> table
    LossTable(n=2, n_lambdas=3, mode='user', consistency=None, n_layers=None)
    >>> table.risks                                     # mean loss per threshold, safest first
    array([0.  , 0.25, 1.  ])
    >>> table.subset([1]).risks                         # the second example only
    array([0. , 0.5, 1. ])
    """

    losses: np.ndarray
    lambdas: np.ndarray
    mode: str = "user"
    consistency: str | None = None
    avg_layers: np.ndarray | None = None
    n_layers: int | None = None
    decay: Decay | None = None

    def __post_init__(self) -> None:
        losses = _losses_iv(self.losses)
        lambdas = _lambdas_iv(self.lambdas)
        if losses.shape[1] != lambdas.size:
            raise ValueError(
                f"losses has {losses.shape[1]} columns but lambdas has {lambdas.size} values; "
                "they must match (one column per threshold)"
            )
        lambdas = lambdas.copy()  # the table owns its grid: never a view of the caller's array, never frozen
        for arr in (losses, lambdas):
            arr.flags.writeable = False
        object.__setattr__(self, "losses", losses)
        object.__setattr__(self, "lambdas", lambdas)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {self.mode!r}")
        if self.consistency is not None and not isinstance(self.consistency, str):
            raise TypeError(f"consistency must be a str or None, got {type(self.consistency).__name__}")
        if self.n_layers is not None:
            object.__setattr__(self, "n_layers", int_at_least(self.n_layers, "n_layers"))
        if self.decay is not None and not isinstance(self.decay, Decay):
            raise TypeError(f"decay must be a calibrate.Decay or None, got {type(self.decay).__name__}")
        if self.avg_layers is not None:
            avg = np.array(self.avg_layers, dtype=np.float64)
            if avg.shape != lambdas.shape:
                raise ValueError(f"avg_layers must have shape {lambdas.shape}, got {avg.shape}")
            exit_layers_iv(avg, self.n_layers, "avg_layers")
            avg.flags.writeable = False
            object.__setattr__(self, "avg_layers", avg)

    @property
    def n(self) -> int:
        """Number of examples."""
        return self.losses.shape[0]

    def __eq__(self, other: object) -> bool:
        """Equal grids, losses (exactly), layers (NaN equal to NaN) and labels."""
        if not isinstance(other, LossTable):
            return NotImplemented
        same_layers = (self.avg_layers is None) == (other.avg_layers is None) and (
            self.avg_layers is None or np.array_equal(self.avg_layers, other.avg_layers, equal_nan=True)
        )
        return (
            (self.mode, self.consistency, self.n_layers, self.decay)
            == (other.mode, other.consistency, other.n_layers, other.decay)
            and np.array_equal(self.lambdas, other.lambdas)
            and np.array_equal(self.losses, other.losses)
            and same_layers
        )

    __hash__ = None  # equal tables compare by value: unhashable, like the arrays they hold

    def __repr__(self) -> str:
        return (
            f"LossTable(n={self.n}, n_lambdas={self.lambdas.size}, mode={self.mode!r}, "
            f"consistency={self.consistency!r}, n_layers={self.n_layers})"
        )

    @property
    def risks(self) -> np.ndarray:
        """Empirical risk per threshold, shape ``(n_lambdas,)``: the compensated column sums the p-values take,
        over ``n`` (a plain mean's last bit followed the order of the examples)."""
        from calibrate.bounds import _column_sums

        return _column_sums(np.ascontiguousarray(self.losses, dtype=np.float64)) / self.n

    def subset(self, rows: ArrayLike) -> LossTable:
        """The table restricted to some examples, without ``avg_layers``: those averaged the exit layers of every
        row's tokens, which the table does not hold per row.

        Parameters
        ----------
        rows : array_like of int or bool
            Distinct row indices in ``[0, n)``, or a boolean mask of shape ``(n,)``.

        Raises
        ------
        ValueError
            When ``rows`` repeats a row (a copy would count as another independent draw, certifying what the
            data do not support), selects none, or lies outside ``[0, n)``.
        TypeError
            When ``rows`` is neither integers nor a boolean mask.
        """
        from calibrate._cache_checks import _subset_iv

        idx = _subset_iv(rows, self.n, unit="example")
        return LossTable(self.losses[idx], self.lambdas, self.mode, self.consistency, None, self.n_layers, self.decay)


def _losses_iv(losses) -> np.ndarray:
    return bounded_array(losses, "losses", why="the p-value bounds assume a bounded loss")


def user_losses(
    losses: ArrayLike,
    lambdas: ArrayLike,
    *,
    consistency: str | None = None,
    avg_layers: ArrayLike | None = None,
    n_layers: int | None = None,
) -> LossTable:
    """Wrap losses computed by the caller (any generator) as a ``mode="user"`` table.

    Parameters
    ----------
    losses : array_like, shape (n_examples, n_lambdas)
        Losses in ``[0, 1]``, columns following ``lambdas``.
    lambdas : array_like, shape (n_lambdas,)
        Thresholds, strictly decreasing (safest first).
    consistency : str, optional
        Name of the loss, recorded in the certificate.
    avg_layers : array_like, shape (n_lambdas,), optional
        Average exit layer per threshold.
    n_layers : int, optional
        Number of layers of the model.

    Examples
    --------
    >>> import numpy as np
    >>> import calibrate
    >>> rng = np.random.default_rng(0)
    >>> losses = rng.random((500, 3)) * [0.0, 0.1, 0.4]   # e.g. 1 - ROUGE-L of your own early outputs
    >>> table = calibrate.user_losses(losses, [0.9, 0.5, 0.1], consistency="my_loss")
    >>> table
    LossTable(n=500, n_lambdas=3, mode='user', consistency='my_loss', n_layers=None)
    >>> np.round(table.risks, 2)
    array([0.  , 0.05, 0.2 ])
    >>> calibrate.certify(table, delta=0.1, epsilon=0.05).lambda_hat
    0.5
    """
    return LossTable(losses, lambdas, "user", consistency, avg_layers, n_layers)


def _consistency_iv(consistency: str, sequences) -> str:
    """``consistency`` checked; a risk needs a reference for every row of the sequence table given."""
    if consistency not in CONSISTENCIES:
        raise ValueError(f"consistency must be one of {CONSISTENCIES}, got {consistency!r}")
    if consistency.startswith("risk_"):
        refs = sequences["reference"]
        if refs.isna().any():
            missing = int(refs.isna().sum())
            raise ValueError(
                f"consistency={consistency!r} compares with references, but {missing} sequences have no "
                "'reference' in the cache"
            )
    return consistency


def proxy_losses(
    cache: LayerCache,
    conf: ArrayLike,
    lambdas: ArrayLike,
    *,
    consistency: str = "token",
    decay: Decay | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    progress: bool = False,
) -> LossTable:
    """Losses of the teacher-forced early-exit simulation along the full-model output.

    At each position of the full-model output, the early token is the top-1 token of the exit layer
    chosen by the threshold; the early output of a sequence is the sequence of its early tokens.

    Parameters
    ----------
    cache : LayerCache
        Calibration cache (one example per sequence).
    conf : array_like, shape (n_tokens, n_layers)
        Confidence of each layer for each cached token (see :func:`measures.confidence.confidence`).
    lambdas : array_like, shape (n_lambdas,)
        Thresholds, strictly decreasing (safest first).
    consistency : str, default="token"
        One of :data:`CONSISTENCIES`: ``"token"`` (fraction of early tokens that differ from the full
        model's), ``"sequence"`` (1 if any differs), ``"rouge_l"``, ``"bleu"``, ``"token_f1"`` (1 - metric
        between early and full text) and their ``risk_*`` versions against the reference.
    decay : Decay, optional
        Decaying threshold.
    decode : callable, optional
        Maps a 1-D integer array of token ids to text, for the textual losses. Defaults to ``cache.decode`` when the
        cache has a vocabulary and its joined pieces give the cache's output texts and no layer predicts a piece
        that is part of a character (U+FFFD); a ValueError names the first sequence or the ids where they do not:
        pass :func:`tokenizer_decode` of the tokenizer. Without a vocabulary it defaults to the space-joined ids
        (ROUGE-L then becomes the LCS F-measure on token ids). The full output is decoded with the same
        function, so equal ids cost 0.
    progress : bool, default=False
        Show a progress bar over sequences (textual losses).

    Returns
    -------
    LossTable
        ``mode="proxy"``, shape ``(n_sequences, n_lambdas)``.

    Notes
    -----
    Proxy losses certify the simulated outputs, not free-running generation, which differs in two ways: after
    an early token that differs, a real decoder continues from a different prefix; and the layers an early exit
    skips get keys and values propagated from its exit state, which later tokens attend to, so a token can
    differ even after a correct prefix and at a position that runs every layer.

    Examples
    --------
    >>> import numpy as np
    >>> import calibrate
    >>> from measures.confidence import confidence
    >>> cache = calibrate.synthetic_cache(100, seed=0)
    >>> conf = confidence(cache, "softmax_max")            # (n_tokens, n_layers)
    >>> table = calibrate.proxy_losses(cache, conf, [0.9, 0.5, 0.1])
    >>> table
    LossTable(n=100, n_lambdas=3, mode='proxy', consistency='token', n_layers=12)
    >>> np.round(table.risks, 3)                          # share of early tokens that differ from the full model's
    array([0.162, 0.569, 0.843])
    >>> np.round(table.avg_layers, 2)                     # lower thresholds exit earlier
    array([7.48, 5.13, 2.91])
    """
    from calibrate.cache import _in_memory_iv

    cache = _in_memory_iv(cache, "cache")
    lam = _lambdas_iv(lambdas)
    consistency = _consistency_iv(consistency, cache.sequences)
    conf = as_numpy(conf)  # a tensor straight from a model too (bfloat16, requiring grad), as exit_layers takes
    n_tokens, n_layers = cache.n_tokens, cache.n_layers
    if conf.shape != (n_tokens, n_layers):
        raise ValueError(f"conf must have shape (n_tokens, n_layers) = {(n_tokens, n_layers)}, got {conf.shape}")
    top1 = np.asarray(cache.arrays["topk_ids"])[:, :, 0]
    full = np.asarray(cache.arrays["full_tokens"])
    if consistency in _TOKEN_LEVEL:
        counts, avg = disagreement_counts(conf, lam, top1, full, cache.offsets, decay=decay)
        lengths = np.asarray(cache.lengths)
        if consistency == "token":
            losses = counts / np.maximum(lengths, 1)[:, None]
        else:
            losses = (counts > 0).astype(np.float64)
        return LossTable(losses, lam, "proxy", consistency, avg, n_layers, decay)
    positions = cache.positions if decay is not None else None
    losses, avg = _textual_losses(cache, conf, lam, top1, full, consistency, positions, decay, decode, progress)
    return LossTable(losses, lam, "proxy", consistency, avg, n_layers, decay)


def _default_decode(vocab: Sequence[str] | None) -> Callable[[Sequence[int]], str]:
    """The textual losses' decoding without ``decode``: the vocab pieces joined, else the space-joined ids."""
    if vocab is not None:
        pieces = np.asarray(vocab, dtype=object)
        return lambda ids: "".join(pieces[np.asarray(ids, dtype=np.intp)])  # == cache.decode, without checks
    return lambda ids: " ".join(map(str, ids))


class _TokenizerDecode:
    """What :func:`tokenizer_decode` returns: a plain object, so it pickles (to Dask workers, say)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids must be one output's token ids, shape (n,), got shape {ids.shape}")
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"tokenizer_decode({type(self.tokenizer).__name__})"


def _str_decode(decode: Callable[[Sequence[int]], str]) -> Callable[[Sequence[int]], str]:
    """``decode``, checked to return ``str`` (a TypeError naming ``decode``, not the scorer's internal argument)."""

    def checked(ids: Sequence[int]) -> str:
        text = decode(ids)
        if not isinstance(text, str):
            raise TypeError(f"decode must return str (the text of token ids), got {type(text).__name__}")
        return text

    return checked


def tokenizer_decode(tokenizer) -> Callable[[Sequence[int]], str]:
    """The ``decode`` of the textual losses for a cache extracted with ``tokenizer``: its own text of the ids.

    Special tokens are skipped, as in the cache's output texts (:func:`calibrate.extract`) and in decoded
    mode, so the full model's ids decode to its output text and equal ids cost 0. The textual losses check
    this on the cache before any work: another tokenizer's decoding is refused.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        Or anything with a ``decode(ids, skip_special_tokens=True)`` method.

    Returns
    -------
    callable
        Token ids (a 1-D integer array or sequence) -> str; pass it as ``decode=`` to :func:`calibrate.fit`,
        :func:`calibrate.validity`, :func:`proxy_losses`, :func:`calibrate.audit` or a chunked cache's
        ``loss_table`` (it pickles, tokenizer included, to every Dask worker).

    Raises
    ------
    TypeError
        If ``tokenizer`` has no ``decode`` method.

    Examples
    --------
    >>> from calibrate.losses import tokenizer_decode
    >>> class Words:   # a stand-in for a Hugging Face tokenizer: ids 0 and 1 are special
    ...     def decode(self, ids, skip_special_tokens=False):
    ...         return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i < 2))
    >>> tokenizer_decode(Words())([5, 7, 1])
    'w5 w7'
    """
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(
            f"tokenizer must have a decode(ids, skip_special_tokens=True) method, got {type(tokenizer).__name__}"
        )
    return _TokenizerDecode(tokenizer)


def _text_iv(vocab: Sequence[str] | None, sequences, consistency: str, decode) -> None:
    """Before any textual loss: refuse a decoding that does not give the cache's own output texts.

    Checked: the default (the vocab pieces joined, used when ``decode`` is None) and :func:`tokenizer_decode`
    (another tokenizer's would score other texts); a ``decode`` of the user's own is taken as it is.
    ``sequences`` is a cache's table (columns ``id``, ``output_ids``, ``output``); the message names the first
    sequence that differs and shows both texts around the first character where they part.
    """
    if consistency in _TOKEN_LEVEL or consistency not in CONSISTENCIES:  # a bad name: reported elsewhere
        return
    if decode is not None and not callable(decode):
        raise TypeError(f"decode must be a callable from token ids to text, got {type(decode).__name__}")
    if decode is None and vocab is not None:
        text = _default_decode(vocab)
        why = (
            "the cache's vocab pieces, joined, do not give its output text",
            "The tokenizer decodes more than a join of pieces (spaces between words, SentencePiece word starts, "
            "bytes of one character split across tokens; or special tokens kept as text by an older extraction), "
            "so the textual losses would score other texts than the model's. Pass decode=calibrate."
            "tokenizer_decode(tokenizer) (command line: --tokenizer DIR; to audit a certificate, the decode it was "
            "fitted with), or, in memory, decode=cache.decode to score the joined pieces anyway (other losses)",
        )
    elif isinstance(decode, _TokenizerDecode):
        text = decode
        why = (
            f"decode={decode!r} does not give the cache's output text",
            "Is it the tokenizer the cache was extracted with?",
        )
    else:
        return
    for seq_id, ids, output in zip(sequences["id"], sequences["output_ids"], sequences["output"]):
        got = text(ids)
        if got != output:
            at = len(os.path.commonprefix([got, output]))
            start = max(0, at - 20)
            raise ValueError(
                f"{why[0]}: sequence {seq_id!r} differs at character {at} ({got[start : at + 20]!r} vs "
                f"{output[start : at + 20]!r}). {why[1]}"
            )


def _partial_piece_ids(vocab: Sequence[str], top1: np.ndarray) -> np.ndarray:
    """The ids in ``top1`` whose vocab pieces are parts of a character (U+FFFD: a byte of a character that
    byte-level tokens split), sorted and distinct."""
    partial = np.fromiter(("\ufffd" in piece for piece in vocab), dtype=bool, count=len(vocab))
    if not partial.any():
        return np.empty(0, dtype=np.int64)
    return np.unique(np.asarray(top1)[partial[top1]])


def _partial_pieces_iv(found: np.ndarray) -> None:
    """Refuse the default decoding (the vocab pieces joined) when a layer of the cache predicts the tokens
    ``found`` (:func:`_partial_piece_ids`): joined, such pieces give other text than the tokenizer decodes, in
    early outputs the full outputs' check never sees."""
    if found.size:
        raise ValueError(
            f"the cache's layers predict tokens whose vocab pieces are parts of a character (ids {found[:5].tolist()}"
            f"{', ...' if found.size > 5 else ''}, each alone U+FFFD): joined, early outputs holding "
            "them are scored on other text than the tokenizer decodes. Pass decode=calibrate.tokenizer_decode("
            "tokenizer) (command line: --tokenizer DIR), or, in memory, decode=cache.decode to score the joined "
            "pieces anyway"
        )


def _textual_losses(cache, conf, lam, top1, full, consistency, positions, decay, decode, progress):
    from calibrate._progress import tqdm
    from measures.consistency import PairScorer, risk_consistency, textual_loss

    if "output" in cache.sequences:  # a Dask task's part has no texts (its cache checked them)
        _text_iv(cache.vocab, cache.sequences, consistency, decode)
    if decode is None and cache.vocab is not None:
        _partial_pieces_iv(_partial_piece_ids(cache.vocab, top1))
    decode = _str_decode(decode or _default_decode(cache.vocab))
    risk = consistency.startswith("risk_")
    scorer = PairScorer(consistency.removeprefix("risk_"))
    offsets = np.asarray(cache.offsets)
    n_seq, k = cache.n_sequences, lam.size
    references = cache.sequences["reference"].tolist() if risk else None
    losses = np.zeros((n_seq, k), dtype=np.float64)
    layer_sum = np.zeros(k, dtype=np.float64)
    with tqdm(total=n_seq, desc=f"{consistency} losses", unit="seq", disable=not progress) as bar:
        for s0 in range(0, n_seq, _SEQUENCES_PER_BATCH):
            s1 = min(s0 + _SEQUENCES_PER_BATCH, n_seq)
            a, b = offsets[s0], offsets[s1]
            layers = exit_layers(conf[a:b], lam, positions=None if positions is None else positions[a:b], decay=decay)
            layer_sum += layers.sum(axis=0)
            early = early_tokens(top1[a:b], layers, full[a:b])
            # Neighbouring thresholds mostly give the same early output: a new output starts only where
            # some token of the sequence changes, so decode and score one output per run of thresholds
            # (the scorer's caches absorb the rare repeats of an earlier run).
            starts = offsets[s0:s1] - a
            changed = np.logical_or.reduceat(early[:, 1:] != early[:, :-1], starts, axis=0)
            run_ids = np.concatenate([np.zeros((s1 - s0, 1), dtype=np.int64), np.cumsum(changed, axis=1)], axis=1)
            for j, s in enumerate(range(s0, s1)):
                lo, hi = starts[j], offsets[s + 1] - a
                cols = np.flatnonzero(np.concatenate([[True], changed[j]]))
                early_texts = [decode(early[lo:hi, c]) for c in cols]
                full_texts = [decode(full[a + lo : a + hi])] * cols.size
                if risk:
                    runs = risk_consistency(early_texts, full_texts, [references[s]] * cols.size, metric=scorer)
                else:
                    runs = textual_loss(early_texts, full_texts, metric=scorer)
                losses[s] = runs[run_ids[j]]
                scorer.clear()  # a sequence's texts recur only within it: hold one sequence's, not the cache's
            bar.update(s1 - s0)
    return losses, layer_sum / max(cache.n_tokens, 1)
