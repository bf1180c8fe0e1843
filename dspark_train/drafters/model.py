"""The drafter: context projection, parallel backbone, sequential head, confidence head; Medusa as a flag, and
EAGLE-3 (kind eagle3) dispatched to drafters/eagle3.py, whose layer drafts token by token instead of in blocks.

Shapes: B batch, T tokens, A anchors per sequence, γ = block_size draft tokens, d hidden, r head rank,
V target vocabulary, Vd draft vocabulary (V unless pruned). Draft k (0-based) of the block for anchor p
predicts the token at p+k+1; its sequential head conditions on the token at p+k (teacher-forced in
training, drafted in inference). Backbone slots sit at positions p, p+1, …, take the anchor (slot 0) or
MASK as input; with `sample_from_anchor` slot k yields draft k (γ slots), without it the anchor slot is
not sampled and slot k+1 yields draft k (γ+1 slots, DFlash's fill-in layout).

Long because the training forward and the incremental inference path (`extend_context`, `propose`,
`head_step`) are one class over one set of weights: kept side by side, a change to one is seen next to the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from ..config import DrafterConfigSection
from . import eagle3
from .config import FINGERPRINT_KEYS, DrafterConfig
from .init import init_from_target
from .layers import DrafterLayer, Eagle3Layer
from .rope import rope_tables


@dataclass
class DrafterOutput:
    logits: torch.Tensor  # [B, A, γ, Vd] fp32, draft-vocab space (rows of padding anchors are finite garbage)
    conf_logits: torch.Tensor  # [B, A, γ] fp32, pre-sigmoid confidence


@dataclass
class DraftState:
    """Inference cache of one batch whose rows share one length (the decoder keeps them in lockstep)."""

    batch_size: int
    length: int = 0  # committed positions seen = the next anchor's position
    # [layers, 2, B, Hkv, capacity, head_dim]: context K (RoPE applied) and V at 0..length-1, then γ scratch
    # slots where `propose` writes the block's own K/V, so attention reads one view without a concat.
    kv: Optional[torch.Tensor] = None
    last_hidden: Optional[torch.Tensor] = None  # medusa: [B, d] at position length-1
    fused: Optional[torch.Tensor] = None  # eagle3: [B, d] fused features at position length-1 (the next step 0's)


@dataclass
class DraftBlock:
    draft_logits: torch.Tensor  # [B, γ, Vd] fp32 base logits U on the draft vocabulary
    hidden: torch.Tensor  # [B, γ, d] backbone output (medusa: head outputs)
    conf_logits: Optional[torch.Tensor] = None  # [B, γ] when confidence does not depend on the previous token
    expand: Optional[Callable] = None  # draft-vocab logits -> target-vocab logits (-inf outside); None: the same

    @property
    def base_logits(self) -> torch.Tensor:
        """[B, γ, V] fp32 on the target vocabulary, -inf outside the draft vocabulary (built on use)."""
        return self.draft_logits if self.expand is None else self.expand(self.draft_logits)

    @property
    def depth(self) -> int:
        """Slots a path may take (an eagle3 round, eagle3.Eagle3Round, has the same field)."""
        return self.draft_logits.shape[1]


class Drafter(PreTrainedModel):
    """DSpark (head markov | rnn | none = DFlash), Medusa or EAGLE-3 drafter over a frozen target's embedding and
    LM head (EAGLE-3: the same weights' layout, its forward and rounds in eagle3.py).

    MASK: slots 1..γ-1 take `mask_embed`, a dedicated learned vector (targets rarely have a spare token whose
    frozen embedding could be repurposed), unless `config.mask_token_id` names a token whose frozen
    embedding is used instead. Confidence input: [h_k ; W1[x_{k-1}]] (paper eq. 7) for markov/rnn; with
    head "none" (DFlash) and for Medusa there is no W1, and the confidence reads h_k alone, so like the
    logits it does not depend on the drafted prefix.
    """

    config_class = DrafterConfig
    base_model_prefix = "drafter"
    main_input_name = "features"
    _no_split_modules = ["DrafterLayer", "Eagle3Layer"]

    def __init__(self, config: DrafterConfig):
        super().__init__(config)
        c = config
        d, r = c.hidden_size, c.head_rank
        vd = c.draft_vocab_size or c.vocab_size
        if c.kind == "dspark":
            self.fc = nn.Linear(len(c.feature_layers) * d, d, bias=False)
            self.ctx_norm = nn.RMSNorm(d, eps=c.rms_norm_eps)
            self.layers = nn.ModuleList(DrafterLayer(c) for _ in range(c.num_layers))
            self.norm = nn.RMSNorm(d, eps=c.rms_norm_eps)
            self.mask_embed = nn.Parameter(torch.empty(d)) if c.mask_token_id is None else None
        elif c.kind == "eagle3":  # drafters/eagle3.py: one autoregressive layer over the fused features
            self.fc = nn.Linear(len(c.feature_layers) * d, d, bias=False)
            self.layers = nn.ModuleList([Eagle3Layer(c)])
            self.norm = nn.RMSNorm(d, eps=c.rms_norm_eps)
        else:  # Medusa: residual SiLU heads on the target's last hidden state, head k = slot k
            self.medusa = nn.ModuleList(nn.Linear(d, d) for _ in range(c.block_size))
        if c.head != "none":
            # W1: previous token -> r; a pruned vocab adds row Vd for target tokens outside it. W2: r -> Vd.
            self.w1 = nn.Embedding(vd + (c.draft_vocab_size is not None), r)
            self.w2 = nn.Linear(r, vd, bias=False)
        if c.head == "rnn":
            self.rnn = nn.Linear(2 * r + d, 3 * r, bias=False)  # W_g, W_c, W_o of z = [s ; W1[x] ; h]
        self.conf = nn.Linear(d + (r if c.head != "none" else 0), 1)
        pruned = c.draft_vocab_size is not None
        self.register_buffer("d2t", torch.zeros(vd, dtype=torch.long) if pruned else None)
        self.register_buffer("t2d", torch.full((c.vocab_size,), vd, dtype=torch.long) if pruned else None)
        # the target's frozen weights, copied by attach_target; lm_weight is None when the (tied) embedding serves
        self.register_buffer("embed_weight", None, persistent=False)
        self.register_buffer("lm_weight", None, persistent=False)
        self._rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self and getattr(self, "mask_embed", None) is not None:
            init.normal_(self.mask_embed, std=self.config.initializer_range)

    # ------------------------------------------------------------------ target and vocabulary
    def attach_target(self, target) -> "Drafter":
        """Copy the target's embedding and LM head into non-persistent buffers (frozen, never saved).

        Copies, so that sharding the target afterwards (ZeRO-3) leaves the drafter working.
        """
        fp = self.config.target_fingerprint or {}
        theirs = target.fingerprint()
        bad = [f"{k}: drafter {fp[k]!r} vs target {theirs.get(k)!r}" for k in FINGERPRINT_KEYS
               if k in fp and fp[k] != theirs.get(k)]
        if list(target.feature_layers) != list(self.config.feature_layers):
            bad.append(f"feature_layers: drafter {self.config.feature_layers} vs target {target.feature_layers}")
        if bad:
            raise ValueError(f"drafter was trained for another target ({fp.get('model_id')}): " + "; ".join(bad))
        emb, lm = target.embed_tokens.weight.detach(), target.lm_head.weight.detach()
        if emb.numel() == 0 or lm.numel() == 0:
            raise RuntimeError("attach_target needs the target's full weights: call it before ZeRO-3 sharding")
        p = self.conf.weight
        self.embed_weight = emb.to(p.device, p.dtype, copy=True)
        if self.d2t is not None:
            self.lm_weight = lm[self.d2t.to(lm.device)].to(p.device, p.dtype)
        else:
            self.lm_weight = None if lm.data_ptr() == emb.data_ptr() else lm.to(p.device, p.dtype, copy=True)
        return self

    @property
    def draft_vocab(self) -> Optional[torch.Tensor]:
        """Target ids of the draft vocabulary (draft index i = target id draft_vocab[i]), or None = all."""
        return self.d2t

    @torch.no_grad()
    def set_draft_vocab(self, token_ids) -> None:
        """Prune the output vocabulary to `token_ids` (target ids, kept in the given order).

        Head rows are sliced from the current full-vocabulary head, so pruning a trained drafter keeps what
        it learned; W1's extra row (initialised to the mean) stands for every token outside.
        """
        if self.d2t is not None:
            raise ValueError("the draft vocabulary is already pruned; set it once, on a full-vocabulary drafter")
        V = self.config.vocab_size
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().to(self.conf.weight.device)
        if ids.numel() == 0 or ids.unique().numel() != ids.numel() or ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"draft vocabulary must be distinct target ids in [0, {V}), got {ids.numel()} ids")
        vd = ids.numel()
        if self.config.head != "none":
            w1 = nn.Embedding(vd + 1, self.config.head_rank).to(self.w1.weight)
            w1.weight[:vd] = self.w1.weight[ids]
            w1.weight[vd] = self.w1.weight.mean(0)
            w2 = nn.Linear(self.config.head_rank, vd, bias=False).to(self.w2.weight)
            w2.weight.copy_(self.w2.weight[ids])
            self.w1, self.w2 = w1, w2
        t2d = torch.full((V,), vd, dtype=torch.long, device=ids.device)
        t2d[ids] = torch.arange(vd, device=ids.device)
        self.d2t, self.t2d = ids, t2d
        if self.embed_weight is not None:
            self.lm_weight = (self.embed_weight if self.lm_weight is None else self.lm_weight)[ids]
        self.config.draft_vocab_size = vd

    def to_draft_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> draft-vocab indices, -1 where outside the draft vocabulary (label mapping for losses)."""
        if self.t2d is None:
            return token_ids
        d = self.t2d[token_ids]
        return d.masked_fill(d == self.d2t.numel(), -1)

    def _w1_rows(self, token_ids):
        return token_ids if self.t2d is None else self.t2d[token_ids]

    def _embedding(self) -> torch.Tensor:
        if self.embed_weight is None:
            raise RuntimeError("drafter has no target weights: call drafter.attach_target(target) first")
        return self.embed_weight

    def _embed(self, token_ids):
        return F.embedding(token_ids, self._embedding())

    def _lm(self, h):
        """Base logits U = frozen LM head (draft-vocab rows) of h, in fp32."""
        return F.linear(h, self._embedding() if self.lm_weight is None else self.lm_weight).float()

    def _full(self, logits):
        """Draft-vocab logits -> full target-vocab logits, -inf outside the draft vocabulary."""
        if self.d2t is None:
            return logits
        full = logits.new_full(logits.shape[:-1] + (self.config.vocab_size,), float("-inf"))
        return full.index_copy_(-1, self.d2t, logits)

    @property
    def num_slots(self) -> int:
        """Backbone slots per block: γ, or γ+1 in the fill-in layout (the anchor slot is not sampled)."""
        return self.config.block_size + (not self.config.sample_from_anchor)

    def _mask_vec(self):
        return self.mask_embed if self.mask_embed is not None else self._embedding()[self.config.mask_token_id]

    def _rope_table(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [≥n, head_dim] fp32, grown by doubling (a plain cache, not a buffer: nothing to save)."""
        if self._rope is None or self._rope[0].shape[0] < n or self._rope[0].device != device:
            size = max(n, 2 * (0 if self._rope is None else self._rope[0].shape[0]), 1024)
            self._rope = rope_tables(self.config.rope_theta, self.config.head_dim, size, device)
        return self._rope

    # ------------------------------------------------------------------ heads (shared by training and inference)
    def _rnn_step(self, h, e, s):
        """One gated update (paper eq. 6): returns tanh(W_o z) for the bias and the new state."""
        gate, cand, out = self.rnn(torch.cat((s, e, h), -1)).chunk(3, -1)
        a = torch.sigmoid(gate)
        return torch.tanh(out), a * s + (1 - a) * torch.tanh(cand)

    def _heads(self, hid, prev) -> DrafterOutput:
        """hid [..., γ, d], prev [..., γ] (slot k's previous token) -> teacher-forced logits and confidences."""
        U = self._lm(hid)
        if self.config.head == "none":
            return DrafterOutput(U, self.conf(hid).squeeze(-1).float())
        e = self.w1(self._w1_rows(prev))
        if self.config.head == "markov":
            bias = self.w2(e)
        else:
            s = hid.new_zeros(hid.shape[:-2] + (self.config.head_rank,))
            outs = []
            for k in range(hid.shape[-2]):
                o, s = self._rnn_step(hid[..., k, :], e[..., k, :], s)
                outs.append(o)
            bias = self.w2(torch.stack(outs, -2))
        return DrafterOutput(U + bias.float(), self.conf(torch.cat((hid, e), -1)).squeeze(-1).float())

    # ------------------------------------------------------------------ training forward
    def forward(self, features, last_hidden, input_ids, anchor_pos) -> DrafterOutput:
        """features [B,T,m·d], last_hidden [B,T,d], input_ids [B,T], anchor_pos [B,A] (-1 = padding).

        Teacher forcing: slot k's previous token is input_ids[p+k], its label input_ids[p+k+1]. DSpark ignores
        last_hidden; Medusa reads only last_hidden[p-1] (anchors must be >= 1) and ignores features; EAGLE-3 feeds
        slot k its own output of slot k-1 (eagle3.py's training-time test).
        """
        if self.config.kind == "eagle3":
            return self._heads(self.norm(eagle3.hidden_states(self, features, input_ids, anchor_pos)), None)
        return self._heads(*self._block_hidden(features, last_hidden, input_ids, anchor_pos))

    def _block_hidden(self, features, last_hidden, input_ids, anchor_pos):
        """Backbone (or Medusa head) outputs of every block [B,A,γ,d] and the teacher-forced previous tokens."""
        g = self.config.block_size
        T = input_ids.shape[1]
        p = anchor_pos.clamp(min=0)
        pos = p[..., None] + torch.arange(g, device=p.device)  # [B, A, γ] slot positions
        prev = input_ids.gather(1, pos.clamp(max=T - 1).flatten(1)).view_as(pos)  # token at p+k
        if self.config.kind == "medusa":
            h = last_hidden.gather(1, (p - 1).clamp(min=0)[..., None].expand(-1, -1, last_hidden.shape[-1]))
            hid = torch.stack([h + F.silu(m(h)) for m in self.medusa], 2)
        else:
            hid = self._backbone(features, prev[..., 0], anchor_pos)
        return hid, prev

    @torch.no_grad()
    def blocks_at(self, features, last_hidden, input_ids, anchor_pos) -> DraftBlock:
        """What `propose` returns at each of the anchors, all in one pass (rows = the B·A blocks, padding
        included): with `head_step` this replays inference drafting at every position of a known text, which
        is how calibration gathers many held-out samples without decoding."""
        if self.config.kind == "eagle3":
            return eagle3.round_at(self, features, input_ids, anchor_pos)
        hid, _ = self._block_hidden(features, last_hidden, input_ids, anchor_pos)
        return self._block(hid.flatten(0, 1))

    def _block(self, hid) -> DraftBlock:
        U = self._lm(hid)
        conf = self.conf(hid).squeeze(-1).float() if self.config.head == "none" else None
        return DraftBlock(U, hid, conf, None if self.d2t is None else self._full)

    def _backbone(self, features, anchors, anchor_pos):
        """All A blocks of a sequence in one attention call: keys = [context (T) ; all blocks (A·S)], and a
        boolean mask lets block a see context j < anchor_a and its own S slots only. Returns the γ sampled
        slots' outputs [B, A, γ, d]."""
        B, A = anchor_pos.shape
        g = self.num_slots
        T = features.shape[1]
        dev = features.device
        ctx = self.ctx_norm(self.fc(features))
        mask_vec = self._mask_vec().expand(B, A, g - 1, -1)
        x = torch.cat((self._embed(anchors)[:, :, None].to(mask_vec.dtype), mask_vec), 2)
        x = x.flatten(1, 2)
        cos, sin = self._rope_table(T + g, dev)
        bpos = (anchor_pos.clamp(min=0)[..., None] + torch.arange(g, device=dev)).flatten(1)
        see_ctx = torch.arange(T, device=dev) < anchor_pos[..., None]  # [B, A, T]; padding (-1) sees none
        see_ctx = see_ctx[:, :, None].expand(B, A, g, T).reshape(B, A * g, T)
        same = torch.eye(A, dtype=torch.bool, device=dev)[:, None, :, None].expand(A, g, A, g).reshape(A * g, A * g)
        mask = torch.cat((see_ctx, same.expand(B, -1, -1)), -1)[:, None]
        for layer in self.layers:
            ck, cv = layer.attn.kv(ctx, cos[:T], sin[:T])  # once per sequence, shared by all blocks
            x = layer(x, lambda kb, vb, ck=ck, cv=cv: (torch.cat((ck, kb), 2), torch.cat((cv, vb), 2)),
                      cos[bpos][:, None], sin[bpos][:, None], mask)
        return self.norm(x).view(B, A, g, -1)[:, :, g - self.config.block_size:]

    # ------------------------------------------------------------------ inference
    def init_state(self, batch_size: int = 1) -> DraftState:
        return DraftState(batch_size)

    def _reserve(self, state: DraftState, need: int) -> None:
        cap = 0 if state.kv is None else state.kv.shape[4]
        if need <= cap:
            return
        c, w = self.config, self.conf.weight
        kv = torch.empty(c.num_layers, 2, state.batch_size, c.num_key_value_heads, max(need, 2 * cap, 256),
                         c.head_dim, dtype=w.dtype, device=w.device)
        if state.kv is not None:
            kv[..., :state.length, :] = state.kv[..., :state.length, :]
        state.kv = kv

    @torch.no_grad()
    def extend_context(self, state: DraftState, features, last_hidden, token_ids=None) -> DraftState:
        """Append newly committed positions: project them and cache their per-layer K/V (old ones untouched).
        token_ids [B, n], the committed tokens at those positions: EAGLE-3 needs them, the others ignore them."""
        n = last_hidden.shape[1]
        if self.config.kind == "eagle3":
            eagle3.extend(self, state, features, token_ids)
            return state
        if self.config.kind == "medusa":
            state.last_hidden = last_hidden[:, -1]
            state.length += n
            return state
        start = state.length
        self._reserve(state, start + n + self.num_slots)
        ctx = self.ctx_norm(self.fc(features.to(self.conf.weight.dtype)))
        cos, sin = self._rope_table(start + n, ctx.device)
        for i, layer in enumerate(self.layers):
            k, v = layer.attn.kv(ctx, cos[start:start + n], sin[start:start + n])
            state.kv[i, 0, :, :, start:start + n] = k
            state.kv[i, 1, :, :, start:start + n] = v
        state.length += n
        return state

    @torch.no_grad()
    def propose(self, state: DraftState, anchor_ids: torch.Tensor) -> DraftBlock:
        """One backbone pass for the block [anchor, MASK…] at position state.length -> base logits, hidden.
        EAGLE-3 has no block pass: this opens its round (eagle3.Eagle3Round) and each head_step drafts."""
        if self.config.kind == "eagle3":
            return eagle3.propose(self, state)
        g = self.num_slots
        if self.config.kind == "medusa":
            if state.last_hidden is None:
                raise ValueError("medusa drafting needs at least one committed position (extend_context first)")
            h = state.last_hidden.to(self.conf.weight.dtype)
            hid = torch.stack([h + F.silu(m(h)) for m in self.medusa], 1)
        else:
            n, B = state.length, anchor_ids.shape[0]
            self._reserve(state, n + g)
            kv = state.kv
            x = torch.cat((self._embed(anchor_ids[:, None]), self._mask_vec().expand(B, g - 1, -1)), 1)
            cos, sin = self._rope_table(n + g, x.device)
            cos, sin = cos[n:n + g], sin[n:n + g]
            for i, layer in enumerate(self.layers):
                def join(kb, vb, i=i):  # the block's K/V go to the scratch slots after the context
                    kv[i, 0, :, :, n:n + g] = kb
                    kv[i, 1, :, :, n:n + g] = vb
                    return kv[i, 0, :, :, :n + g], kv[i, 1, :, :, :n + g]
                x = layer(x, join, cos, sin)
            hid = self.norm(x)[:, g - self.config.block_size:]
        return self._block(hid)

    @torch.no_grad()
    def head_step(self, block: DraftBlock, k: int, prev_tokens: torch.Tensor, head_state=None, full: bool = True):
        """Slot k's distribution for each of N parent tokens (the token at position anchor+k): cheap, no backbone.

        Returns logits [B,N,V] fp32 (full vocab; `full=False`: [B,N,Vd] on the draft vocabulary, whose ids
        `draft_vocab` maps to target ids: a softmax over them is the same distribution, 6× cheaper at 8k of 49k),
        conf_logit [B,N] (pre-sigmoid) and, for the RNN head, the per-candidate state [B,N,r] that a child of
        candidate n passes back as head_state[:, n]. Returned tensors may be expanded views: do not modify them
        in place.
        """
        if self.config.kind == "eagle3":  # one step of the draft layer per depth, every candidate at once
            return eagle3.head_step(self, block, k, prev_tokens, head_state, full)
        B, N = prev_tokens.shape
        if self.config.head == "none":
            logits = block.base_logits if full else block.draft_logits
            return logits[:, k, None].expand(B, N, -1), block.conf_logits[:, k, None].expand(B, N), None
        h = block.hidden[:, k, None].expand(B, N, -1)
        e = self.w1(self._w1_rows(prev_tokens))
        s = None
        if self.config.head == "markov":
            bias = self.w2(e)
        else:
            o, s = self._rnn_step(h, e, h.new_zeros(B, N, self.config.head_rank) if head_state is None else head_state)
            bias = self.w2(o)
        logits = block.draft_logits[:, k, None] + bias.float()
        return self._full(logits) if full else logits, self.conf(torch.cat((h, e), -1)).squeeze(-1).float(), s


# ---------------------------------------------------------------------- construction
def build_drafter(section: DrafterConfigSection, target) -> Drafter:
    """A new drafter for `target` (or the exported one at `section.init_from`), attached, on the target's device.
    `section.init: target` starts a new one from the target's layers (drafters/init.py).

    A pruned draft vocabulary is set afterwards from data (`set_draft_vocab`), since it needs token counts.
    """
    cfg = DrafterConfig.from_target(section, target.config, target.feature_layers, target.vocab_size,
                                    target.fingerprint())
    if section.init_from:
        drafter = Drafter.from_pretrained(section.init_from)
        bad = [k for k in ("kind", "head", "num_layers", "block_size", "head_rank", "qk_norm", "sample_from_anchor")
               if getattr(drafter.config, k) != getattr(cfg, k)]
        if bad:
            raise ValueError(f"drafter.init_from {section.init_from}: recipe and artifact differ in "
                             + ", ".join(f"{k} ({getattr(cfg, k)} vs {getattr(drafter.config, k)})" for k in bad))
    else:
        drafter = Drafter(cfg)
        if section.init == "target":
            init_from_target(drafter, target, section.init_acceptance, fit_qk=section.qk_norm_init == "fit")
    return drafter.to(target.device).attach_target(target)


def count_parameters(section: DrafterConfigSection, target_config, num_feature_layers: int = 5) -> int:
    """Trainable parameters of the drafter a recipe section would build, from the target's config alone
    (built on the meta device: no weights, instant even for 70B-class targets). Honours draft_vocab_size; only
    the number of feature layers matters."""
    cfg = DrafterConfig.from_target(section, target_config, list(range(1, num_feature_layers + 1)))
    cfg.draft_vocab_size = section.draft_vocab_size
    with torch.device("meta"):
        return Drafter(cfg).num_parameters(only_trainable=True)
