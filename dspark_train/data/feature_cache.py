"""A compact, memory-mapped cache of the target's features, so epochs ≥ 2 skip the target forward.

`data.feature_cache` (off | bfloat16 | int8 | float32) stores, for every training sequence, the feature layers
and the final hidden state at each token: m + 1 rows of width d per token (SmolLM2: 6 × 576). bfloat16 costs
2·(m+1)·d bytes per token; int8 stores each row quantised with its own absmax scale (fp32), (m+1)·(d + 4) bytes.
p_t is recomputed from the cached final hidden state at the block positions (the LM head is cheap there), and the
anchors are resampled every epoch, so nothing else needs storing.

Hybrid: the first pass over the data runs the target online and writes what it computed; later passes read.
Data that `dspark data` regenerated with `data.capture_features` arrives with its features (capture.py): then
the first pass reads too. The trainer always sees the stored precision: online features are rounded through the
cache format as they are written, so epoch 1 and the later epochs see the same inputs, and a row gives the same
numbers whether it came from the target or from disk (a resume with a cold cache equals one with a warm cache).
Evaluation stays online.

Layout: `<root>/<key>/manifest.json` and `shard-*.safetensors`, one shard per micro-batch written, holding
`rows` [tokens, m+1, d] (and `scale` [tokens, m+1] for int8) with the sequence ids and offsets in its metadata.
A shard is written to a temp file and renamed into place, so a kill leaves it whole or absent; an unreadable
shard is ignored and its sequences recomputed. Reads go through safetensors' memory map (`safe_open`), a
slice per sequence. The key hashes everything the stored numbers depend on: the target (fingerprint: model id,
revision, architecture, sizes, feature layers, tokenizer hash; the precision it runs in as resolved, not the recipe's
`auto`; adapter, inline config and seed), the data (the conversation files' sha256, max_seq_len) and the storage
format. A changed key is a different
directory: nothing stale is ever read (a run's own cache root drops the directories of other keys; a shared root,
`data.feature_cache_dir`, keeps them for other runs). Sequences are addressed by conversation id, so the
held-out split, γ and max_prompts do not change the key. Each rank writes its own shards and reads any rank's
(it rescans the directory on a miss); under a sharded (ZeRO-3) target, whose forward needs every rank, the ranks
agree per step whether to run it.

Cost reference: DeepSpec's offline cache for Qwen3-4B is ~38 TB (≈12·d bytes per token). The same features in
bfloat16 here are 2·(m+1)·d = 12·d bytes per token with m = 5, and int8 halves that.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..layout import atomic_path, check_version, read_json, write_atomic

FORMATS = ("bfloat16", "int8", "float32")
STAGING = "capture-"  # `dspark data`'s captured features before their file is whole (capture.py): never stale
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(target_parts: dict, data_parts: dict, fmt: str) -> tuple[str, dict]:
    """(directory name, the parts it hashes) for a target, a data source and a storage format."""
    parts = {"format_version": FORMAT_VERSION, "format": fmt, "target": target_parts, "data": data_parts}
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20], parts


# --------------------------------------------------------------------------- storage format
def encode(rows: torch.Tensor, fmt: str) -> dict:
    """rows [N, m+1, d] (any float dtype) → the tensors stored for them."""
    if fmt == "bfloat16":
        return {"rows": rows.to(torch.bfloat16)}
    if fmt == "float32":
        return {"rows": rows.float()}
    x = rows.float()
    scale = x.abs().amax(-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return {"rows": torch.round(x / scale[..., None]).clamp(-127, 127).to(torch.int8), "scale": scale}


def decode(stored: dict, dtype: torch.dtype) -> torch.Tensor:
    rows = stored["rows"]
    if "scale" in stored:
        return (rows.float() * stored["scale"][..., None]).to(dtype)
    return rows.to(dtype)


def bytes_per_token(num_rows: int, hidden: int, fmt: str) -> int:
    """Stored bytes per token: (m+1) rows of width d, plus a fp32 scale per row for int8."""
    return num_rows * hidden * {"bfloat16": 2, "float32": 4, "int8": 1}[fmt] + (4 * num_rows if fmt == "int8" else 0)


@dataclass
class _Entry:
    shard: Path
    start: int
    length: int


class FeatureCache:
    """One key's directory: which sequences are stored where, reading and writing them."""

    def __init__(self, root: Path, key: str, parts: dict, fmt: str, owns_root: bool, rank: int = 0):
        self.dir, self.fmt, self.rank = Path(root) / key, fmt, rank
        self.entries: dict[str, _Entry] = {}
        self._seen: set[str] = set()  # shard file names already indexed (or found unreadable)
        self._handles: dict[Path, object] = {}
        self.hits = self.misses = 0
        if owns_root and rank == 0 and Path(root).is_dir():
            for other in Path(root).iterdir():  # this run's cache for another target/data/format: stale
                if other.is_dir() and other.name != key and not other.name.startswith(STAGING):
                    shutil.rmtree(other, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / MANIFEST).is_file():  # a newer dspark-train's cache: refused, naming it
            check_version(read_json(self.dir / MANIFEST), self.dir / MANIFEST, FORMAT_VERSION,
                          f"delete {self.dir} to recompute the features")
        elif rank == 0:
            write_atomic(self.dir / MANIFEST, json.dumps(parts, indent=1, default=str))
        self.rescan()

    def rescan(self) -> None:
        """Index the complete shards that appeared since the last scan (this rank's or any other's)."""
        from safetensors import safe_open

        for path in sorted(self.dir.glob("shard-*.safetensors")):
            if path.name in self._seen:
                continue
            self._seen.add(path.name)
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                ids, offsets = json.loads(meta["ids"]), json.loads(meta["offsets"])
            except Exception:  # not ours or unreadable: its sequences are recomputed and written again
                continue
            for i, sid in enumerate(ids):
                self.entries.setdefault(sid, _Entry(path, offsets[i], offsets[i + 1] - offsets[i]))

    def has(self, sid: str) -> bool:
        return sid in self.entries

    def read(self, sid: str, dtype: torch.dtype) -> torch.Tensor:
        """The decoded rows [length, m+1, d] of sequence `sid` (a memory-mapped slice of its shard)."""
        from safetensors import safe_open

        e = self.entries[sid]
        f = self._handles.get(e.shard)
        if f is None:
            f = self._handles[e.shard] = safe_open(str(e.shard), "pt")
        stored = {k: f.get_slice(k)[e.start:e.start + e.length] for k in f.keys()}
        return decode(stored, dtype)

    def write(self, items: list[tuple[str, dict]]) -> None:
        """Store [(sequence id, encoded rows)] as one shard, atomically."""
        from safetensors.torch import save_file

        items = [(sid, t) for sid, t in items if sid not in self.entries]
        if not items:
            return
        ids = [sid for sid, _ in items]
        offsets = [0]
        for _, t in items:
            offsets.append(offsets[-1] + len(t["rows"]))
        tensors = {k: torch.cat([t[k] for _, t in items]).contiguous() for k in items[0][1]}
        name = f"shard-r{self.rank}-{hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]}.safetensors"
        path = self.dir / name
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"ids": json.dumps(ids), "offsets": json.dumps(offsets)})
        self._seen.add(name)
        for i, sid in enumerate(ids):
            self.entries[sid] = _Entry(path, offsets[i], offsets[i + 1] - offsets[i])

    def stats(self, num_rows: int, hidden: int) -> dict:
        tokens = sum(e.length for e in self.entries.values())
        disk = sum(p.stat().st_size for p in self.dir.glob("shard-*.safetensors"))
        return {"format": self.fmt, "dir": str(self.dir), "sequences": len(self.entries), "tokens": tokens,
                "bytes": disk, "bytes_per_token": bytes_per_token(num_rows, hidden, self.fmt),
                "hits": self.hits, "misses": self.misses}


class FeatureSource:
    """Target features for a training micro-batch: online, or hybrid through a `FeatureCache`.

    Returns (features [B,T,m·d], last_hidden [B,T,d]) in `dtype`; with a cache both are rounded through its
    format and zero at padding, whichever way they were obtained."""

    def __init__(self, target, cache: Optional[FeatureCache], dtype: torch.dtype, acc=None, sharded: bool = False):
        self.target, self.cache, self.dtype, self.acc, self.sharded = target, cache, dtype, acc, sharded

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            f = self.target.forward_features(batch.input_ids, batch.attention_mask)
            return f.features, f.last_hidden
        cache, ids = self.cache, batch.example_ids
        lengths = batch.attention_mask.sum(1).tolist()
        missing = [i for i, sid in enumerate(ids) if sid is not None and not cache.has(sid)]
        if missing:
            cache.rescan()  # another rank may have written them
            missing = [i for i in missing if not cache.has(ids[i])]
        need = bool(missing)
        if self.sharded:  # the sharded target's forward is collective: all ranks run it if any rank needs it
            need = bool(self.acc.reduce(torch.tensor([len(missing)], device=self.acc.device), "sum").item())
        if need:
            cache.misses += len(missing)
            return self._online(batch, ids, lengths, missing)
        cache.hits += sum(sid is not None for sid in ids)
        B, T = batch.input_ids.shape
        m = len(self.target.feature_layers)
        d = self.target.hidden_size
        rows = torch.zeros(B, T, m + 1, d, dtype=self.dtype)
        for i, sid in enumerate(ids):
            if sid is not None:
                rows[i, :lengths[i]] = cache.read(sid, self.dtype)
        return self._split(rows.to(batch.input_ids.device))

    def _online(self, batch, ids, lengths, missing) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.target.forward_features(batch.input_ids, batch.attention_mask)
        enc = encode(f.rows(), self.cache.fmt)
        self.cache.write([(ids[i], {k: v[i, :lengths[i]].cpu() for k, v in enc.items()}) for i in missing])
        out = decode(enc, self.dtype)
        out = out * batch.attention_mask[:, :, None, None].to(out.dtype)  # zero at padding, as a read gives
        return self._split(out)

    @staticmethod
    def _split(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = rows.shape[:2]
        return rows[:, :, :-1].reshape(B, T, -1), rows[:, :, -1]


def target_key_parts(recipe, target) -> dict:
    """What the stored numbers depend on from the target."""
    t = recipe.target
    # the precision the target runs in, as resolved (`auto` is bf16 on one CPU and fp32 on another)
    return {**target.fingerprint(), "dtype": target.precision.value, "adapter": t.adapter, "gguf_file": t.gguf_file,
            "config": t.config, "seed": t.seed if t.config is not None else None}


def cache_key_for(recipe, target, data_paths) -> tuple[str, dict]:
    """The key (and its parts) of the recipe's features of these conversation files, for this target."""
    paths = data_paths if isinstance(data_paths, (list, tuple)) else [data_paths]
    sha = [file_sha256(p) for p in paths]  # one file: its hash as before (existing caches keep their key)
    data_parts = {"conversations_sha256": sha[0] if len(sha) == 1 else sha, "max_seq_len": recipe.data.max_seq_len}
    return cache_key(target_key_parts(recipe, target), data_parts, recipe.data.feature_cache)


def open_cache(recipe, run_root: Path, target, data_paths, rank: int) -> Optional[FeatureCache]:
    """The recipe's cache (None when `data.feature_cache` is off): `<run_root>/<key>` by default (the run's
    `RunDir.feature_cache`), `<data.feature_cache_dir>/<key>` when a shared root is set (where `dspark data`
    puts the features it captured)."""
    fmt = recipe.data.feature_cache
    if fmt == "off":
        return None
    key, parts = cache_key_for(recipe, target, data_paths)
    shared = recipe.data.feature_cache_dir
    root = Path(shared).expanduser() if shared else Path(run_root)
    return FeatureCache(root, key, parts, fmt, owns_root=not shared, rank=rank)
