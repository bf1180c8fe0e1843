"""The drafters' transformer layers: GQA attention (optional per-head q/k norm), the SwiGLU MLP, DSpark's pre-norm
block, and EAGLE-3's layer, whose attention reads the token embedding beside the hidden state."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DrafterConfig
from .rope import rotate


class Attention(nn.Module):
    """GQA attention; with `qk_norm`, per-head RMSNorm of q and k before RoPE (Qwen3: what the engines run)."""

    def __init__(self, c: DrafterConfig, in_features: Optional[int] = None):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        d = c.hidden_size
        n = in_features or d  # EAGLE-3: 2d, [embedding ; hidden]
        self.q_proj = nn.Linear(n, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(n, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(n, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, d, bias=False)
        self.q_norm = nn.RMSNorm(self.hd, eps=c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = nn.RMSNorm(self.hd, eps=c.rms_norm_eps) if c.qk_norm else None

    def kv(self, x, cos, sin):
        """[B, L, in] -> K (normed, RoPE applied), V: [B, Hkv, L, hd]. Used for both context and block positions."""
        B, L, _ = x.shape
        k = self.k_proj(x).view(B, L, self.nkv, self.hd)
        if self.k_norm is not None:
            k = self.k_norm(k)
        v = self.v_proj(x).view(B, L, self.nkv, self.hd).transpose(1, 2)
        return rotate(k.transpose(1, 2), cos, sin), v

    def forward(self, x, join: Callable, cos, sin, mask=None):
        """Block queries attend to join(block K, block V) = [context ; block] keys and values."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.nh, self.hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = rotate(q.transpose(1, 2), cos, sin)
        k, v = join(*self.kv(x, cos, sin))
        g = self.nh // self.nkv
        # GQA without repeating K/V: the g query heads of one KV head become g·L query rows of that head.
        q = q.reshape(B, self.nkv, g * L, self.hd)
        if mask is not None and g > 1:
            mask = mask.repeat(1, 1, g, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.reshape(B, self.nh, L, self.hd).transpose(1, 2).reshape(B, L, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    """Pre-norm block. The context K/V come from the projected context directly (already normed), not x."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, join, cos, sin, mask=None):
        x = x + self.attn(self.attn_norm(x), join, cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: attention reads [RMSNorm(token embedding) ; RMSNorm(hidden)] (2d wide) and adds to
    the hidden itself (the residual stream is the hidden, not the concatenation), then the usual MLP block.
    `hidden` is the fused target features at the first step and the layer's own previous output after.

    Names map one to one onto speculators' Eagle3 first layer: attn_norm = input_layernorm (the embedding's),
    hidden_norm, attn.{q,k,v,o}_proj (q/k/v 2d → heads), attn.{q,k}_norm (a Qwen3 layer; none: Llama),
    mlp_norm = post_attention_layernorm, mlp.*."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.hidden_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.attn = Attention(c, 2 * c.hidden_size)
        self.mlp_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = MLP(c)

    def inputs(self, emb, hidden):
        """What attention reads, for queries and for keys/values alike: [B, L, 2d]."""
        return torch.cat((self.attn_norm(emb), self.hidden_norm(hidden)), -1)

    def forward(self, emb, hidden, join, cos, sin, mask=None):
        x = hidden + self.attn(self.inputs(emb, hidden), join, cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))
