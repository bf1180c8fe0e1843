"""EAGLE-3 (Li et al., 2025) as a drafter kind: its training-time test and its drafting rounds.

A `Drafter` with `config.kind == "eagle3"` has the weights `fc`, `layers.0` (an `Eagle3Layer`), `norm` and
`conf`. The target's low, middle and high layer features are fused by one projection, g = fc([f_lo ; f_mid ; f_hi]).
Entry j of the draft layer's KV cache is (g_{j−1}, x_j): the fused features of position j−1 beside the embedding
of token j, at RoPE position j (speculators' numbering; vLLM's is one lower for queries and keys alike, the same
attention). Position 0 has no entry. The layer's output o goes through the drafter's own `norm` into the frozen
target LM head (its draft-vocabulary rows) and is fed back as the hidden of the next step.

At anchor p (the last committed token; the target's features are known up to p−1), draft k predicts the token at
p+k+1:
    step 0:  (g_{p−1}, x_p)      → o_0 → draft 0
    step k:  (o_{k−1}, x_{p+k})  → o_k → draft k
each step attending to the committed entries 1..p−1 and to the earlier steps of its own path. Decoding feeds the
drafted x̂_{p+k}; training feeds the data's x_{p+k} (teacher forcing on tokens, as EAGLE-3 and speculators do)
beside the drafter's own o_{k−1}: the training-time test. The trainer's blocks are these chains at the sampled
anchors: one K/V pass over every context entry with the target's true features, then γ steps for all A anchors
at once, step k of anchor p seeing the entries ≤ p−1 and its own steps 0..k (EAGLE-3's diagonal mask restricted
to the sampled anchors). The output is the DSpark `DrafterOutput` [B, A, γ, Vd], so the loss, the feature cache,
ZeRO, checkpoints and everything after training apply unchanged.

Confidence: `conf` reads norm(o_k) and is trained with the DSpark soft label. The paper's EAGLE-3 has no
confidence head; this one is what lets calibration and the adaptive policy serve EAGLE-3 drafters.

Inference through the decoder's Drafter API: `extend` appends committed entries computed from the target's true
features; `propose` opens a round (`Eagle3Round`) whose scratch entries follow the committed ones in the same
buffer; `head_step` runs one step for every row and candidate at once, a candidate seeing the scratch entries of
its own ancestors (`Eagle3Rows`, the per-candidate state draft_tree re-indexes by frontier). The next `extend`
overwrites the scratch, so a rejected draft leaves nothing behind.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Eagle3Rows:
    """Per-candidate state between head steps: the candidate's output o and the scratch entries it sees (its path's
    and its own). Indexing selects candidates (draft_tree: `rows[:, parent_rows]`)."""

    hidden: torch.Tensor  # [R, N, d]
    sees: torch.Tensor  # [R, N, S] bool over the round's scratch entries

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def __getitem__(self, key) -> "Eagle3Rows":
        return Eagle3Rows(self.hidden[key], self.sees[key])


@dataclass
class Eagle3Round:
    """A drafting round over B sequences with A anchors each (head_step's rows are the B·A pairs, sequence-major):
    committed entries in slots 0..ctx−1 of `kv`, the round's scratch entries after them."""

    kv: torch.Tensor  # [2, B, Hkv, capacity, hd]: K (RoPE applied) and V
    ctx: int  # committed entry slots
    visible: torch.Tensor  # [B, A] committed entries each row sees (anchor p: the p−1 entries 1..p−1)
    pos: torch.Tensor  # [B, A] RoPE position of step 0 (the anchor's)
    hidden: torch.Tensor  # [B, A, d] step 0's hidden, g_{p−1}
    depth: int  # steps a path may take: γ, what training unrolled
    used: int = 0  # scratch entries written

    def room(self, n: int) -> None:
        """Make room for n more scratch entries: past the buffer's end, a private copy (a state's buffer keeps its
        committed entries untouched)."""
        need, cap = self.ctx + self.used + n, self.kv.shape[3]
        if need > cap:
            kv = self.kv.new_empty(*self.kv.shape[:3], max(need, 2 * cap), self.kv.shape[4])
            kv[:, :, :, :self.ctx + self.used] = self.kv[:, :, :, :self.ctx + self.used]
            self.kv = kv


def _context(d, features, input_ids, anchor_pos):
    """What the training forward and `round_at` share: K/V of the context entries 1..T−1 [B, Hkv, T−1, hd], each
    anchor's step-0 hidden g_{p−1} [B, A, d] (zeros at p = 0: no position before), the anchors clamped (padding
    −1 → 0: finite garbage) and the RoPE tables."""
    layer = d.layers[0]
    B, T = input_ids.shape
    g = d.fc(features)
    cos, sin = d._rope_table(T + d.config.block_size, input_ids.device)
    k, v = layer.attn.kv(layer.inputs(d._embed(input_ids[:, 1:]), g[:, :-1]), cos[1:T], sin[1:T])
    p = anchor_pos.clamp(min=0)
    before = torch.cat((g.new_zeros(B, 1, g.shape[-1]), g[:, :-1]), 1)  # g_{j−1} at j
    hidden = before.gather(1, p[..., None].expand(-1, -1, g.shape[-1]))
    return k, v, hidden, p, cos, sin


def hidden_states(d, features, input_ids, anchor_pos) -> torch.Tensor:
    """Training-time test at the sampled anchors: the layer outputs o_k [B, A, γ, d] (pre-norm), the data's tokens
    fed, the drafter's own outputs carried from step to step."""
    layer = d.layers[0]
    T, A = input_ids.shape[1], anchor_pos.shape[1]
    ck, cv, h, p, cos, sin = _context(d, features, input_ids, anchor_pos)
    see_ctx = torch.arange(T - 1, device=p.device) < (p - 1)[..., None]  # [B, A, T−1]: entries 1..p−1
    own = torch.eye(A, dtype=torch.bool, device=p.device)[None].expand(p.shape[0], -1, -1)
    keys, values, outs = [ck], [cv], []

    def join(kb, vb):  # the step's entries join the chains: keys [context ; step 0 (A) ; … ; step k (A)]
        keys.append(kb)
        values.append(vb)
        return torch.cat(keys, 2), torch.cat(values, 2)

    for k in range(d.config.block_size):
        pos = p + k
        tokens = input_ids.gather(1, pos.clamp(max=T - 1))
        mask = torch.cat((see_ctx, own.repeat(1, 1, k + 1)), -1)[:, None]
        h = layer(d._embed(tokens), h, join, cos[pos][:, None], sin[pos][:, None], mask)
        outs.append(h)
    return torch.stack(outs, 2)


def round_at(d, features, input_ids, anchor_pos) -> Eagle3Round:
    """A round at every anchor of known texts at once (`Drafter.blocks_at`: calibration's replay), over the texts'
    own context entries; `head_step` then drafts exactly as the decoder would."""
    ck, cv, hidden, p, _, _ = _context(d, features, input_ids, anchor_pos)
    B, A = p.shape
    n = ck.shape[2]
    kv = ck.new_empty(2, B, ck.shape[1], n + A * d.config.block_size, ck.shape[3])
    kv[0, :, :, :n], kv[1, :, :, :n] = ck, cv
    return Eagle3Round(kv, n, (p - 1).clamp(min=0), p, hidden, d.config.block_size)


# ---------------------------------------------------------------------- inference
def extend(d, state, features, token_ids: Optional[torch.Tensor]) -> None:
    """Commit n positions (features [B, n, m·d] of tokens token_ids [B, n]): their entries (g_{j−1}, x_j), the
    first one paired with the last committed position's fused features (`state.fused`)."""
    if token_ids is None:
        raise ValueError("an eagle3 drafter pairs each token with the previous position's features: "
                         "extend_context needs token_ids")
    n = token_ids.shape[1]
    if features.shape[1] != n:
        raise ValueError(f"extend_context: {features.shape[1]} positions of features but {n} token ids")
    layer, start = d.layers[0], state.length
    g = d.fc(features.to(d.conf.weight.dtype))
    before = g[:, :-1] if state.fused is None else torch.cat((state.fused[:, None], g[:, :-1]), 1)
    m = before.shape[1]  # new entries: all n, or n−1 when position 0 (no entry) is among them
    lo, hi = start + n - m, start + n  # their positions j, in slots j−1
    d._reserve(state, hi)
    if m:
        cos, sin = d._rope_table(hi, g.device)
        k, v = layer.attn.kv(layer.inputs(d._embed(token_ids[:, n - m:]), before), cos[lo:hi], sin[lo:hi])
        state.kv[0, 0, :, :, lo - 1:hi - 1] = k
        state.kv[0, 1, :, :, lo - 1:hi - 1] = v
    state.fused = g[:, -1]
    state.length = hi


def propose(d, state) -> Eagle3Round:
    """Open a round at the anchor (position state.length): scratch after the committed entries, step 0's hidden
    the last committed position's fused features. The anchor token itself comes as head_step(0)'s previous token."""
    if state.length == 0:
        raise ValueError("eagle3 drafting needs at least one committed position (extend_context first)")
    g = d.config.block_size
    d._reserve(state, state.length + 4 * g)  # a chain needs γ scratch entries; a tree more (grown on demand)
    B, ctx = state.batch_size, state.length - 1
    full = torch.full((B, 1), ctx, dtype=torch.long, device=state.kv.device)
    return Eagle3Round(state.kv[0], ctx, full, full + 1, state.fused[:, None], g)


def head_step(d, rnd: Eagle3Round, k: int, prev_tokens: torch.Tensor, rows: Optional[Eagle3Rows], full: bool):
    """Step k for N candidates of each of the round's rows: prev_tokens [B·A, N] (the token at anchor+k), `rows`
    the state their parents returned (None at k = 0: the round's own hidden). Returns logits [B·A, N, V] (full)
    or [B·A, N, Vd], confidence logits [B·A, N] and the candidates' rows."""
    B, A = rnd.pos.shape
    R, N = prev_tokens.shape
    M, dev = A * N, prev_tokens.device
    if rows is None:
        if k:
            raise ValueError(f"eagle3 head_step at depth {k} needs the state its parents' step returned")
        hidden = rnd.hidden[:, :, None].expand(B, A, N, -1).reshape(B, M, -1)
        sees = torch.zeros(B, M, 0, dtype=torch.bool, device=dev)
    else:
        hidden, sees = rows.hidden.reshape(B, M, -1), rows.sees.reshape(B, M, -1)
    s0, c = rnd.used, rnd.ctx
    rnd.room(M)
    kv = rnd.kv
    own = torch.zeros(B, M, s0 + M, dtype=torch.bool, device=dev)
    own[..., :sees.shape[-1]] = sees
    new = torch.arange(M, device=dev)
    own[:, new, s0 + new] = True
    see_ctx = (torch.arange(c, device=dev) < rnd.visible[..., None]).repeat_interleave(N, 1)
    mask = torch.cat((see_ctx, own), -1)[:, None]
    pos = (rnd.pos + k).repeat_interleave(N, 1)
    cos, sin = d._rope_table(int(pos.max()) + 1, dev)

    def join(kb, vb):  # the candidates' entries go to the scratch slots
        kv[0, :, :, c + s0:c + s0 + M] = kb
        kv[1, :, :, c + s0:c + s0 + M] = vb
        return kv[0, :, :, :c + s0 + M], kv[1, :, :, :c + s0 + M]

    o = d.layers[0](d._embed(prev_tokens.reshape(B, M)), hidden.to(kv.dtype), join, cos[pos][:, None],
                    sin[pos][:, None], mask)
    rnd.used = s0 + M
    h = d.norm(o)
    logits = d._lm(h).view(R, N, -1)
    return (d._full(logits) if full else logits), d.conf(h).squeeze(-1).float().view(R, N), \
        Eagle3Rows(o.view(R, N, -1), own.view(R, N, -1))
