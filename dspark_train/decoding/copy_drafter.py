"""The copy drafter: continuations copied from the request's own tokens (prompt + output so far).

Prompt lookup, made incremental and calibrated. Three parts:

- `CopyIndex`: for every n = 1..max_ngram, the n-gram ending at each position maps to {next token: [count,
  last position]}. Appending a token adds max_ngram entries (O(1) per token for a fixed max_ngram); the
  context is never rescanned. A query looks up the current suffix from the longest n down, so the longest
  indexed match and every distinct token that followed it come out of ≤ max_ngram dictionary lookups.
  Matches longer than max_ngram are measured by comparing backwards from the most recent occurrence, at
  most `max_match` tokens (bounded work, not a rescan).
- `CopyDrafter.propose`: up to `max_candidates` continuations with distinct first tokens (the longest match
  first, shorter matches for more distinct tokens), each copied from the most recent occurrence that was
  followed by its first token, up to `max_depth` tokens. Every copied token carries a feature cell (how long
  the match supporting it is, how consistently that context was followed by that token) and an estimate of
  its conditional acceptance in that cell.
- `CopyStats`: per-cell acceptance counts, Beta-smoothed. The prior comes from calibration
  (`fit_copy_prior`: greedy drafting replayed over held-out target answers, stored as calibration.json's
  `copy`) or, without one, a weak hand-set prior; each request then learns online from its own verified
  copy nodes (`observe`).

Everything here is plain Python over token ids: no torch, nothing on the device.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from ..policy.calibration import read_calibration
from ..layout import ArtifactError

LEN_EDGES = (1, 2, 3, 4, 6, 9, 16, 32)  # match-length buckets: 1, 2, 3, 4-5, 6-8, 9-15, 16-31, 32+
AGREEMENT = ("single", "unanimous", "majority", "minority")  # how the supporting context was followed
N_CELLS = len(LEN_EDGES) * len(AGREEMENT)


def cell(match: int, count: int, total: int) -> int:
    """Feature cell of a copied token: its match-length bucket × agreement (the context occurred once;
    always followed by this token; mostly; rarely)."""
    length = bisect_right(LEN_EDGES, match) - 1
    agree = 0 if total == 1 else 1 if count == total else 2 if 2 * count >= total else 3
    return length * len(AGREEMENT) + agree


@dataclass(frozen=True)
class CopyConfig:
    max_ngram: int = 8  # longest n-gram indexed
    min_ngram: int = 1  # shortest match that proposes
    max_candidates: int = 3  # continuations (distinct first tokens) per round
    max_depth: int = 16  # tokens per continuation
    max_match: int = 64  # match lengths are measured up to this many tokens

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram or self.max_candidates < 1 or self.max_depth < 1:
            raise ValueError(f"bad copy drafter config {self}")


# --------------------------------------------------------------------------- the index
class CopyIndex:
    """n-gram → next-token statistics over a growing token list (see the module docstring)."""

    def __init__(self, max_ngram: int, tokens: Iterable[int] = ()):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.table: dict[tuple, dict[int, list[int]]] = {}
        self.extend(tokens)

    def extend(self, new: Iterable[int]) -> None:
        """Append tokens: each one is recorded as the continuation of the n-grams ending just before it."""
        toks, table, big = self.tokens, self.table, self.max_ngram
        for t in new:
            i = len(toks)
            ctx = tuple(toks[max(0, i - big):i])
            for n in range(1, len(ctx) + 1):
                nxt = table.setdefault(ctx[-n:], {})
                entry = nxt.get(t)
                if entry is None:
                    nxt[t] = [1, i]
                else:
                    entry[0] += 1
                    entry[1] = i
            toks.append(t)

    def following(self, n: int) -> Optional[dict[int, list[int]]]:
        """{next token: [count, last position]} over earlier occurrences of the current n-token suffix."""
        if n > len(self.tokens):
            return None
        return self.table.get(tuple(self.tokens[len(self.tokens) - n:]))

    def longest(self, min_n: int = 1) -> int:
        """Length (≤ max_ngram) of the longest suffix that occurred earlier with a continuation; 0 if none."""
        for n in range(min(self.max_ngram, len(self.tokens) - 1), min_n - 1, -1):
            if self.following(n):
                return n
        return 0

    def match_length(self, pos: int, cap: int) -> int:
        """Common suffix length (≤ cap) of tokens[:pos] and the whole token list (pos < len)."""
        toks, end, m = self.tokens, len(self.tokens), 0
        while m < cap and m < pos and toks[pos - 1 - m] == toks[end - 1 - m]:
            m += 1
        return m


# --------------------------------------------------------------------------- acceptance estimates
@dataclass
class CopyPrior:
    """Beta prior per feature cell: hits and trials (pseudo-counts). `weight` caps a calibrated prior's
    pseudo-count per cell, so a request's own evidence still moves it."""

    hits: list[float]
    trials: list[float]
    weight: float = 16.0

    @classmethod
    def default(cls) -> "CopyPrior":
        """A weak prior (2 pseudo-trials per cell) with the shape a replay over 300 of the SmolLM2 training
        conversations showed (T = 0.7 answers): acceptance grows with the match length and falls steeply
        when the context was followed by other tokens too. Calibration replaces it with measured counts."""
        mean = {"single": (0.25, 0.45, 0.55, 0.65, 0.7, 0.8, 0.85, 0.9),
                "unanimous": (0.65, 0.8, 0.85, 0.9, 0.95, 0.95, 0.95, 0.97),
                "majority": (0.15, 0.25, 0.3, 0.35, 0.4, 0.45, 0.6, 0.8),
                "minority": (0.07, 0.1, 0.1, 0.1, 0.15, 0.2, 0.4, 0.5)}
        cells = [mean[a][length] for length in range(len(LEN_EDGES)) for a in AGREEMENT]
        return cls([2.0 * m for m in cells], [2.0] * N_CELLS)

    @classmethod
    def from_counts(cls, hits: Sequence[float], trials: Sequence[float], weight: float = 16.0) -> "CopyPrior":
        """Measured counts shrunk to at most `weight` pseudo-trials per cell; empty cells keep the default."""
        d = cls.default()
        out_h, out_t = [], []
        for h, t, dh, dt in zip(hits, trials, d.hits, d.trials):
            if t <= 0:
                out_h.append(dh)
                out_t.append(dt)
            else:
                s = min(1.0, weight / (t + dt))
                out_h.append((h + dh) * s)
                out_t.append((t + dt) * s)
        return cls(out_h, out_t, weight)

    def to_dict(self) -> dict:
        return {"cells": {"length_edges": list(LEN_EDGES), "agreement": list(AGREEMENT)}, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "CopyPrior":
        if not d:
            return cls.default()
        cells = d.get("cells", {})
        if list(cells.get("length_edges", LEN_EDGES)) != list(LEN_EDGES) or \
                list(cells.get("agreement", AGREEMENT)) != list(AGREEMENT):
            raise ArtifactError("calibration.json: the copy prior's feature cells differ from this dspark-train's; "
                                "re-run `dspark calibrate`")
        return cls([float(x) for x in d["hits"]], [float(x) for x in d["trials"]], float(d.get("weight", 16.0)))


@dataclass
class CopyStats:
    """Online per-cell counts on top of a prior: estimate = (prior hits + hits) / (prior trials + trials)."""

    prior: CopyPrior
    hits: list[int] = field(default_factory=lambda: [0] * N_CELLS)
    trials: list[int] = field(default_factory=lambda: [0] * N_CELLS)

    def estimate(self, c: int) -> float:
        return (self.prior.hits[c] + self.hits[c]) / (self.prior.trials[c] + self.trials[c])

    def add(self, c: int, hit: bool) -> None:
        self.trials[c] += 1
        self.hits[c] += bool(hit)


# --------------------------------------------------------------------------- the drafter
@dataclass
class CopyCandidate:
    """One continuation: tokens[j] is copied from position source + j; cells[j] its feature cell and
    probs[j] its estimated acceptance given that tokens[:j] were accepted."""

    tokens: list[int]
    cells: list[int]
    probs: list[float]
    source: int
    match: int  # length of the match that supports the first token


@dataclass
class CopyState:
    """One request: the index over its committed tokens and what it has learned so far."""

    index: CopyIndex
    stats: CopyStats


class CopyDrafter:
    """Draft by copying (the decoder's drafter shape: init_state / extend_context / propose), plus
    `observe` for online learning of the acceptance estimates."""

    def __init__(self, config: Optional[CopyConfig] = None, prior: Optional[CopyPrior] = None):
        self.config = config or CopyConfig()
        self.prior = prior or CopyPrior.default()

    def init_state(self, token_ids: Iterable[int] = ()) -> CopyState:
        return CopyState(CopyIndex(self.config.max_ngram, token_ids), CopyStats(self.prior))

    def extend_context(self, state: CopyState, token_ids: Iterable[int]) -> CopyState:
        """Append newly committed tokens (the anchor included: it is known before the round)."""
        state.index.extend(token_ids)
        return state

    def propose(self, state: CopyState, max_depth: Optional[int] = None) -> list[CopyCandidate]:
        """Continuations of the committed tokens, best first (longest match, then count, then recency)."""
        cfg, idx = self.config, state.index
        depth = min(cfg.max_depth, cfg.max_depth if max_depth is None else max_depth)
        n = idx.longest(cfg.min_ngram)
        if n == 0 or depth <= 0:
            return []
        found = {}  # first token -> (match, count, total, last position)
        for m in range(n, cfg.min_ngram - 1, -1):
            nxt = idx.following(m)
            total = sum(e[0] for e in nxt.values())
            for tok, (count, last) in nxt.items():
                if tok not in found:
                    match = m if m < idx.max_ngram else idx.match_length(last, cfg.max_match)
                    found[tok] = (match, count, total, last)
            if len(found) >= cfg.max_candidates:
                break
        ranked = sorted(found.items(), key=lambda kv: (-kv[1][0], -kv[1][1], -kv[1][3]))[:cfg.max_candidates]
        return [self._continuation(state, tok, *info, depth) for tok, info in ranked]

    def _continuation(self, state: CopyState, tok: int, match: int, count: int, total: int, last: int,
                      depth: int) -> CopyCandidate:
        idx, cap = state.index, self.config.max_match
        toks = idx.tokens[last:last + depth]
        cells = [cell(match, count, total)]
        for j in range(1, len(toks)):  # token j continues the source: its context is the match plus j tokens
            m = min(match + j, cap)
            s = last + j
            nxt = idx.table[tuple(idx.tokens[s - min(m, idx.max_ngram):s])]
            cells.append(cell(m, nxt[toks[j]][0], sum(e[0] for e in nxt.values())))
        return CopyCandidate(toks, cells, [state.stats.estimate(c) for c in cells], last, match)

    @staticmethod
    def observe(state: CopyState, outcomes: Iterable[tuple[int, bool]]) -> None:
        """Learn from verified copy tokens: (feature cell, accepted) for each one whose parent was accepted."""
        for c, hit in outcomes:
            state.stats.add(c, hit)


# --------------------------------------------------------------------------- calibration
def replay_counts(texts: Sequence[tuple[Sequence[int], int]], config: Optional[CopyConfig] = None
                  ) -> tuple[list[int], list[int]]:
    """Per-cell (hits, trials) of greedy copy drafting replayed at every position of each text's answer.

    texts: (token ids, answer start) pairs of the target's own greedy answers, so "accepted" = equal to the
    text. At answer position t the index holds tokens[:t] (prompt, earlier answer tokens, the anchor) and each
    candidate's tokens are compared with the text from t on; token j is a trial when tokens 0..j-1 matched."""
    drafter = CopyDrafter(config, CopyPrior.default())
    hits, trials = [0] * N_CELLS, [0] * N_CELLS
    for ids, start in texts:
        ids = list(ids)
        state = drafter.init_state(ids[:max(1, start)])
        for t in range(max(1, start), len(ids)):
            for cand in drafter.propose(state, len(ids) - t):
                for j, (tok, c) in enumerate(zip(cand.tokens, cand.cells)):
                    trials[c] += 1
                    if tok != ids[t + j]:
                        break
                    hits[c] += 1
            state.index.extend([ids[t]])
    return hits, trials


def fit_copy_prior(texts: Sequence[tuple[Sequence[int], int]], config: Optional[CopyConfig] = None,
                   weight: float = 16.0) -> CopyPrior:
    """The calibrated prior (calibration.json `copy`): replayed counts, shrunk to `weight` per cell."""
    return CopyPrior.from_counts(*replay_counts(texts, config), weight=weight)


def prior_from_calibration(calibration: Union[str, Path, dict, None]) -> CopyPrior:
    """calibration.json's `copy` prior (written by `dspark calibrate`), else the default prior (no calibration,
    or a file written before the field existed)."""
    return CopyPrior.from_dict(read_calibration(calibration).get("copy") if calibration is not None else None)
