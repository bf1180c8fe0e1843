"""Feature capture while `dspark data` generates: the target already runs over every token of its answers, so
its feature layers and final hidden state are kept then, in the trainer's feature cache, and training on data
regenerated here never runs the target over it again (`data.capture_features`).

One batched `generate` (left padding): `FrozenTarget.recording` keeps each decoder forward's rows, the prefill's
columns then one per decoding step, so row b's tokens sit in consecutive columns from where its prompt starts:
its prompt, then every token it fed back. The trainer's sequence of the finished conversation
(`chat.conversation_ids`) starts with those tokens and goes on past them: the end-of-turn tokens after the answer
(and a cut answer's last token, never fed back). One more forward over the returned KV cache computes those, with
the padding and whatever a finished row fed after its end masked out. Where the trainer's tokens part from the fed
ones (an answer that re-tokenises otherwise), the forward continues from the last shared token, so every stored
row is what the target computes for the trainer's own sequence.

A `Captured` lives for one user turn (`generate._answer_turn`): the conversations that turn finishes take their
rows to the host, then its KV cache and batch rows are dropped. Peak: one turn's cache and rows [B, columns, m+1, d]
on the device (Mistral-7B's shape, 16 × 2k columns in bf16: 4 GiB of cache, 1.5 GiB of rows with 5 feature layers),
plus the host rows of the batch's finished conversations; no cache is held to the end of the batch.

The key of the trainer's cache hashes the finished conversation file, so shards gather in a staging directory
beside it while `dspark data` runs (features written after their answers: a kill never leaves features without
their answer) and the run that writes the merged file links them under its key (`publish`).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .feature_cache import STAGING, FeatureCache, cache_key, cache_key_for, target_key_parts
from ..layout import RunDir


@dataclass
class Captured:
    """What one batched `generate` computed: rows [B, P, m+1, d] for the KV cache's P columns."""

    rows: torch.Tensor
    cache: object
    columns: torch.Tensor  # [B, P] the token fed at each column (left padding first)
    starts: list[int]  # the column where each row's prompt begins

    def common_prefix(self, b: int, seq: list[int]) -> int:
        """How many leading tokens of `seq` row b fed, in order, from its first column."""
        fed = self.columns[b, self.starts[b]:].tolist()
        n = 0
        while n < min(len(fed), len(seq)) and fed[n] == seq[n]:
            n += 1
        return n

    @torch.no_grad()
    def sequence_rows(self, target, seqs: list[Optional[list[int]]]) -> list[Optional[torch.Tensor]]:
        """Rows [len(seq), m+1, d] of each row's trainer sequence (None where seq is None): the columns it shares
        with what the row fed, then one forward over the cache for the rest."""
        shared = [self.common_prefix(b, s) if s else 0 for b, s in enumerate(seqs)]
        tails = [s[n:] if s else [] for s, n in zip(seqs, shared)]
        B, P = self.columns.shape
        T = max(map(len, tails))
        extra = None
        if T:
            pad = target.tokenizer.pad_token_id or 0
            ids = torch.full((B, T), pad, dtype=torch.long)
            mask = torch.zeros(B, P + T, dtype=torch.long)
            for b, (tail, n) in enumerate(zip(tails, shared)):
                ids[b, :len(tail)] = torch.tensor(tail, dtype=torch.long)
                mask[b, self.starts[b]:self.starts[b] + n] = 1
                mask[b, P:P + max(1, len(tail))] = 1  # a row with nothing to add attends to one pad: no empty row
            pos = torch.tensor(shared)[:, None] + torch.arange(T)[None]
            dev = target.device
            f = target.forward_features(ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                                        cache=self.cache)
            extra = f.rows()
        out = []
        for b, (s, n, tail) in enumerate(zip(seqs, shared, tails)):
            if s is None:
                out.append(None)
                continue
            head = self.rows[b, self.starts[b]:self.starts[b] + n]
            # a new tensor even without a tail: a view would keep the whole batch's rows alive with it
            out.append(torch.cat((head, extra[b, :len(tail)]) if tail else (head,)))
        return out


# --------------------------------------------------------------------------- where captured features go
def _staging(recipe, target, out: Path, shard: int) -> FeatureCache:
    """Everything captured for `dspark data`'s output file `out`: its key cannot hash the file before the file is
    whole, so shards gather here (kept across runs: a resumed run adds to them) and `publish` links them under
    the key of the finished file."""
    fmt = recipe.data.feature_cache
    key, parts = cache_key(target_key_parts(recipe, target), {"staging_for": str(out.resolve()),
                                                              "max_seq_len": recipe.data.max_seq_len}, fmt)
    return FeatureCache(_root(recipe), f"{STAGING}{key}", parts, fmt, owns_root=False, rank=shard)


def _root(recipe) -> Path:
    """Where the trainer of this recipe looks: data.feature_cache_dir, else its run's own cache directory."""
    shared = recipe.data.feature_cache_dir
    return Path(shared).expanduser() if shared else RunDir(recipe.run_dir).feature_cache


def open_staging(recipe, target, out: Path, shard: int, answered: set) -> FeatureCache:
    """The staging cache of `out` for shard `shard`. Features are written after their answers, so every staged
    id is answered in `out`; one that is not means the output was replaced since (its answers may differ now):
    the staged features are dropped, never matched to other answers."""
    stage = _staging(recipe, target, out, shard)
    if any(sid not in answered for sid in stage.entries):
        shutil.rmtree(stage.dir)
        stage = _staging(recipe, target, out, shard)
    return stage


def publish(recipe, target, out: Path) -> Optional[FeatureCache]:
    """Link the staged shards of `out` into the trainer's cache directory for the finished file (hard links: no
    second copy); returns that cache, or None when nothing was captured."""
    stage = _staging(recipe, target, out, 0)
    shards = sorted(stage.dir.glob("shard-*.safetensors"))
    if not shards:
        return None
    key, parts = cache_key_for(recipe, target, [out])
    cache = FeatureCache(stage.dir.parent, key, parts, recipe.data.feature_cache, owns_root=False)
    for path in shards:
        dest = cache.dir / path.name
        if not dest.exists():
            try:
                os.link(path, dest)
            except OSError:  # a file system without hard links
                shutil.copy2(path, dest)
    cache.rescan()
    return cache
