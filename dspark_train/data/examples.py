"""Training data: prompt and conversation files → token ids + loss masks → anchor blocks → batches.

Reads the prompt files `dspark data` (regenerate.py) answers and the conversations it writes, tokenises through
`chat.py` (the one template path shared with evaluation), splits off a deterministic held-out set, samples
anchors and lays out block labels. Everything random is seeded by the *global* sample position, so a batch does
not depend on how many processes share the work.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from .chat import conversation_ids
from ..config import Recipe, RecipeError, utf8_text
from ..layout import DataFileError, RunDir, atomic_path, iter_jsonl
from ..layout import read_jsonl as read_jsonl_file

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")  # owner/name, optionally :config


# =========================================================================== files
def output_path(recipe: Recipe) -> Path:
    """Where `dspark data` writes its conversations (default <run>/data.jsonl, where the trainer reads them)."""
    if recipe.data.output:
        return recipe.resolve_path(recipe.data.output)
    return RunDir(recipe.run_dir).data


def conversations_paths(recipe: Recipe) -> list[Path]:
    """The conversation files training reads: `data.conversations` if set, else what `dspark data` wrote."""
    given = recipe.data.conversations
    paths = [recipe.resolve_data_path(p) for p in given] if given else [output_path(recipe)]
    for path in paths:
        if not path.is_file():
            hint = "" if given else " (run `dspark data RECIPE` first)"
            raise RecipeError(f"{recipe.source}: data.conversations: file not found: {path}{hint}")
    return paths


SKIP_HINT = "fix the line, or set data.skip_bad_lines=true to skip bad lines"


def read_jsonl(path: Path) -> list[dict]:
    """This code's own append-only JSON-lines outputs (`dspark data`'s parts, merged file and failures): a line
    torn by a kill mid-write is skipped (its record is simply redone); a missing file is empty."""
    return read_jsonl_file(path, skip_bad=True, quiet=True) if path.is_file() else []


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _is_conversation(r) -> bool:
    if not isinstance(r, dict) or "id" not in r:
        return False
    if "error" in r:  # a failure `dspark data` recorded: well-formed, just not usable
        return True
    msgs = r.get("conversations")
    return isinstance(msgs, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                          and isinstance(m.get("content"), str) for m in msgs)


def read_conversations(paths, skip_bad_lines: bool = False) -> list[dict]:
    """Every record of one conversations file or several (in order; an id in two files fails naming both), checked
    line by line: a line that is not UTF-8, not JSON or not `{"id", "conversations": [{"role", "content"}, ...]}`
    fails naming the file and the line, or is skipped and counted with `skip_bad_lines` (data.skip_bad_lines)."""
    if isinstance(paths, (list, tuple)):
        out, seen = [], {}
        for path in paths:
            for r in read_conversations(path, skip_bad_lines):
                other = seen.setdefault(str(r["id"]), path)
                if other != path:
                    raise DataFileError(f"{path}: id {r['id']!r} is also in {other}: conversation ids must be unique "
                                        "across data.conversations")
                out.append(r)
        return out
    path = paths
    out, bad = [], []
    for lineno, r in iter_jsonl(path, skip_bad_lines, SKIP_HINT):
        if _is_conversation(r):
            out.append(r)
        elif not skip_bad_lines:
            raise DataFileError(f'{path}: line {lineno}: expected {{"id", "conversations": [{{"role", "content"}}, '
                                f'...]}}; {SKIP_HINT}')
        else:
            bad.append(lineno)
    if bad:
        print(f"note: {path}: skipped {len(bad)} record(s) that are not conversations (line {bad[0]}"
              f"{', …' if len(bad) > 1 else ''})", file=sys.stderr)
    return out


def load_conversations(paths, limit: Optional[int] = None, skip_bad_lines: bool = False) -> list[dict]:
    """Conversation records `{"id", "conversations": [messages]}` of one file or several, in file order; records
    with an error skipped."""
    return usable_conversations(read_conversations(paths, skip_bad_lines), limit)


def usable_conversations(records: list[dict], limit: Optional[int] = None) -> list[dict]:
    out = [r for r in records if "error" not in r and r.get("conversations")]
    return out[:limit] if limit is not None else out


# =========================================================================== prompts
def prompt_turns(record: dict) -> list[str]:
    """The user turns of a prompt record: `turns`, chat `messages`/`conversations`, or one prompt under `prompt`,
    `instruction` (+ `input`/`context`), `question`, `problem` or `text` (the public datasets' column names)."""
    if "turns" in record:
        turns = record["turns"]
    elif "messages" in record or "conversations" in record:
        msgs = record.get("messages") or record.get("conversations")
        turns = [m["content"] for m in msgs if m.get("role") == "user"]
    else:
        key = next((k for k in ("prompt", "instruction", "question", "problem", "text") if record.get(k)), None)
        turns = record[key] if key else None
        extra = record.get("input") or record.get("context")
        if key == "instruction" and isinstance(turns, str) and isinstance(extra, str) and extra.strip():
            turns = f"{turns}\n\n{extra}"
    if isinstance(turns, str):
        turns = [turns]
    if not turns or not all(isinstance(turn, str) and turn.strip() for turn in turns):
        raise ValueError(f"no usable user turns in {sorted(record)}")
    return turns


def _local_prompt_rows(path: Path, skip_bad_lines: bool) -> list:
    """Rows of a local prompt file: parquet (via `datasets`), a JSON array, or JSON lines (the shared reader)."""
    if path.suffix == ".parquet":
        from datasets import load_dataset
        return list(load_dataset("parquet", data_files=str(path), split="train"))
    if path.suffix == ".json":
        try:
            rows = json.loads(utf8_text(path.read_bytes(), path))
            if isinstance(rows, list):
                return rows
        except json.JSONDecodeError:
            pass  # JSON lines under a .json name
    rows = []
    for lineno, r in iter_jsonl(path, skip_bad_lines, SKIP_HINT):
        if isinstance(r, dict):
            rows.append(r)
        elif not skip_bad_lines:
            raise DataFileError(f"{path}: line {lineno}: expected a JSON object; {SKIP_HINT}")
    return rows


PROMPTS_FIX = ("set data.root to a directory holding the prompt file, data.prompts to a local .jsonl/.parquet file, "
               "or data.prompts_hub_id to Hub datasets this machine can download")


def _hub_prompt_rows(recipe: Recipe, specs: list[str], local: Path) -> Iterator[tuple[str, int, dict]]:
    """(dataset, index, row) from the train splits of Hub datasets "owner/name[:config]", taken in turn (so a
    max_prompts cut keeps the mix). A dataset that cannot be loaded is one line saying what to set instead."""
    from datasets import load_dataset

    loaded = []
    for spec in specs:
        name, _, config = spec.partition(":")
        try:
            loaded.append((name, load_dataset(name, config or None, split="train")))
        except Exception as e:  # noqa: BLE001 — offline, no such dataset, no access: one fix for all
            offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                       if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
            first = (str(e).strip().splitlines() or [""])[0][:200]
            why = f"{offline[0]}=1 is set: unset it to download" if offline else f"{type(e).__name__}: {first}"
            raise RecipeError(f"{recipe.source}: data.prompts: no file at {local}, and the Hub fallback "
                              f"data.prompts_hub_id {spec!r} cannot be loaded ({why}); {PROMPTS_FIX}") from None
    for i in range(max((len(ds) for _, ds in loaded), default=0)):
        for name, ds in loaded:
            if i < len(ds):
                yield name, i, ds[i]


def load_prompts(recipe: Recipe) -> list[dict]:
    """Prompt records `{"id", "category", "raw"}`: the local file `data.prompts` (under `data.root`) when it
    exists (nothing touches the network then), else the Hub datasets `data.prompts_hub_id` (or `data.prompts`
    itself when it names one).

    Turns are parsed later, per prompt, so one malformed record becomes a recorded failure, not a crash."""
    data_cfg = recipe.data
    local = recipe.resolve_data_path(data_cfg.prompts)
    if local.is_file():
        rows = ((None, i, r) for i, r in enumerate(_local_prompt_rows(local, data_cfg.skip_bad_lines)))
    elif data_cfg.prompts_hub_id or (HUB_ID.match(data_cfg.prompts) and not local.suffix):
        rows = _hub_prompt_rows(recipe, data_cfg.prompts_hub_id or [data_cfg.prompts], local)
    else:
        raise RecipeError(f"{recipe.source}: data.prompts: file not found: {local} (and no data.prompts_hub_id); "
                          + PROMPTS_FIX)
    out = []
    for dataset, i, r in rows:
        if data_cfg.max_prompts is not None and len(out) >= data_cfg.max_prompts:
            break
        rid = r.get("id") if r.get("id") is not None else i
        out.append({"id": str(rid) if dataset is None else f"{dataset}:{rid}",
                    "category": r.get("category") or (dataset.split("/")[-1] if dataset else None), "raw": r})
    return out


# =========================================================================== tokenisation and split
@dataclass
class Example:
    id: str
    input_ids: list[int]
    loss_mask: list[int]


def longest_run(mask: list[int]) -> int:
    best = run = 0
    for m in mask:
        run = run + 1 if m else 0
        best = max(best, run)
    return best


def tokenize(conversations: list[dict], tokenizer, max_len: int, block_size: int) -> tuple[list[Example], int]:
    """Token ids and assistant-only loss masks through `chat.conversation_ids`. A sequence whose longest
    supervised run cannot hold one full block (anchor + γ labels) is dropped; returns (examples, dropped)."""
    out, dropped = [], 0
    for c in conversations:
        ids, mask = conversation_ids(tokenizer, c["conversations"], max_len)
        if longest_run(mask) < block_size + 1:
            dropped += 1
            continue
        out.append(Example(str(c["id"]), ids, mask))
    return out, dropped


def split_heldout(items: list, n: int, seed: int, key=lambda x: x["id"]) -> tuple[list, list]:
    """Deterministic held-out split by a seeded hash of the id: independent of file order and of the rest."""
    ranked = sorted(items, key=lambda x: hashlib.sha256(f"{seed}:{key(x)}".encode()).hexdigest())
    held = {key(x) for x in ranked[:n]}
    return [x for x in items if key(x) not in held], [x for x in items if key(x) in held]


# =========================================================================== anchors and batches
@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right padded
    attention_mask: torch.Tensor  # [B, T]
    anchor_pos: torch.Tensor  # [B, A] long, -1 = padding
    labels: torch.Tensor  # [B, A, γ] target token ids for slots 0..γ-1 (pad id where invalid)
    valid: torch.Tensor  # [B, A, γ] bool: the contiguous supervised prefix of each block
    example_ids: tuple = field(default=())  # each row's Example.id (None = empty row): the feature cache's keys

    def to(self, device) -> "Batch":
        return Batch(*(x.to(device) for x in (self.input_ids, self.attention_mask, self.anchor_pos,
                                               self.labels, self.valid)), self.example_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions p where the anchor and the next token are both supervised."""
    m = loss_mask.bool()
    return torch.nonzero(m[:-1] & m[1:]).flatten()


def sample_anchors(loss_mask: list[int], count: int, seed: Optional[int]) -> torch.Tensor:
    """Up to `count` anchors without replacement, sorted; seed None takes the first `count` (evaluation)."""
    cand = anchor_candidates(torch.tensor(loss_mask))
    if len(cand) > count:
        if seed is None:
            cand = cand[torch.linspace(0, len(cand) - 1, count).round().long()]
        else:
            g = torch.Generator().manual_seed(seed)
            cand = cand[torch.randperm(len(cand), generator=g)[:count]].sort().values
    return cand


def block_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchor_pos: torch.Tensor, gamma: int,
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot k of the block at anchor p is labelled input_ids[p+k+1]; it is valid while p+1..p+k+1 are all
    supervised (the contiguous prefix). Returns labels [B,A,γ] and valid [B,A,γ]."""
    B, T = input_ids.shape
    pos = anchor_pos.unsqueeze(-1) + 1 + torch.arange(gamma)  # [B, A, γ] label positions
    inside = (anchor_pos.unsqueeze(-1) >= 0) & (pos < T)
    idx = pos.clamp(0, T - 1).view(B, -1)
    labels = torch.gather(input_ids, 1, idx).view_as(pos)
    ok = torch.gather(loss_mask.bool(), 1, idx).view_as(pos) & inside
    valid = ok.long().cumprod(-1).bool()
    return torch.where(valid, labels, torch.full_like(labels, pad_id)), valid


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2 ** 62)


def make_batch(examples: list[Optional[Example]], seeds: list[Optional[int]], anchors: int, gamma: int,
               pad_id: int) -> Batch:
    """Right-padded batch with anchors and block labels. A None example is an empty row (no anchors): it keeps
    every rank's batch count equal when a split does not divide evenly."""
    T = max((len(e.input_ids) for e in examples if e is not None), default=1)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    lmask = torch.zeros((B, T), dtype=torch.long)
    apos = torch.full((B, anchors), -1, dtype=torch.long)
    for i, (e, s) in enumerate(zip(examples, seeds)):
        if e is None:
            continue
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        att[i, :n] = 1
        lmask[i, :n] = torch.tensor(e.loss_mask)
        a = sample_anchors(e.loss_mask, anchors, s)
        apos[i, : len(a)] = a
    labels, valid = block_labels(ids, lmask, apos, gamma, pad_id)
    return Batch(ids, att, apos, labels, valid, tuple(None if e is None else e.id for e in examples))


class GlobalOrder:
    """Sample order as a function of the global position: epoch e visits a seeded permutation of the data.

    Position p → (epoch, example index). Ranks and micro-batches take consecutive slices of the positions,
    so the data a step sees depends only on where it starts, never on the world size.

    With `lengths`, each epoch's permutation is cut into chunks of `chunk` positions, each chunk is sorted by
    length and cut into runs of `granule` positions (the micro-batch size), and the runs are shuffled within
    the chunk: a micro-batch holds sequences of similar length, so it pads little (on a 2-core CPU the target's
    forward over padding was half of a step), while every epoch still visits every example once in a random
    order of batches."""

    def __init__(self, n: int, seed: int, lengths: Optional[list[int]] = None, chunk: int = 0, granule: int = 1):
        if n == 0:
            raise RecipeError("no training examples left (all conversations too short or held out)")
        self.n, self.seed, self._perms = n, seed, {}
        self.lengths = torch.as_tensor(lengths) if lengths is not None and chunk > granule else None
        self.chunk, self.granule = chunk, max(1, granule)

    def __call__(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: self._permutation(epoch)}
        return epoch, int(self._perms[epoch][offset])

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
        perm = torch.randperm(self.n, generator=g)
        if self.lengths is None:
            return perm
        out = []
        for chunk in perm.split(self.chunk):
            ranked = chunk[torch.sort(self.lengths[chunk], stable=True).indices]
            runs = ranked.split(self.granule)
            out += [runs[i] for i in torch.randperm(len(runs), generator=g).tolist()]
        return torch.cat(out)


def train_batch(examples: list[Example], order: GlobalOrder, start: int, size: int, recipe: Recipe,
                gamma: int, pad_id: int) -> Batch:
    """The micro-batch of global positions start..start+size-1."""
    picks = [order(p) for p in range(start, start + size)]
    return make_batch([examples[i] for _, i in picks], [sample_seed(recipe.data.seed, e, i) for e, i in picks],
                      recipe.data.anchors_per_seq, gamma, pad_id)


def eval_batches(examples: list[Example], batch_size: int, rank: int, world: int, anchors: int, gamma: int,
                 pad_id: int) -> list[Batch]:
    """This rank's share of the held-out set with fixed, evenly spread anchors; every rank gets the same
    number of batches (empty rows pad the last ones) because sharded models need every rank in each forward."""
    examples = sorted(examples, key=lambda e: len(e.input_ids))  # similar lengths per batch: little padding
    per_round = batch_size * world
    rounds = -(-len(examples) // per_round)
    out = []
    for r in range(rounds):
        rows = [r * per_round + rank * batch_size + j for j in range(batch_size)]
        exs = [examples[i] if i < len(examples) else None for i in rows]
        out.append(make_batch(exs, [None] * batch_size, anchors, gamma, pad_id))
    return out
