"""The drafter's HF config: architecture derived from the target, plus the target fingerprint it was trained against."""
from __future__ import annotations

from typing import Optional

from transformers import PretrainedConfig

from ..config import DRAFTER_HEADS, DRAFTER_KINDS, DrafterConfigSection

FORMAT_VERSION = 1
FINGERPRINT_KEYS = ("num_hidden_layers", "hidden_size", "vocab_size", "feature_layers", "tokenizer_hash")


class DrafterConfig(PretrainedConfig):
    """kind "dspark" (head "markov" | "rnn" | "none" = DFlash) or "medusa" (block_size independent heads).

    `block_size` = γ draft tokens per block. `sample_from_anchor` (the speculators name) picks the slot layout:
    true: γ slots [x0, MASK…], slot k predicts draft token k+1 (DSpark/DeepSpec); false: γ+1 slots, the anchor
    slot is not sampled and slot k+1 predicts draft token k+1 (DFlash fill-in, what vLLM's `dflash` runs).
    `qk_norm`: per-head RMSNorm of queries and keys before RoPE (Qwen3), which the serving engines always apply;
    a config.json without the key is an older artifact without it.
    `vocab_size` is the target's; `draft_vocab_size` (set by `Drafter.set_draft_vocab`) the pruned output vocab.
    """

    model_type = "dspark_drafter"

    def __init__(self, kind: str = "dspark", head: str = "markov", num_layers: int = 1, block_size: int = 8,
                 head_rank: int = 256, hidden_size: int = 64, intermediate_size: int = 128,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: Optional[int] = None,
                 rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6, vocab_size: int = 260,
                 feature_layers: Optional[list[int]] = None, draft_vocab_size: Optional[int] = None,
                 mask_token_id: Optional[int] = None, initializer_range: float = 0.02,
                 target_fingerprint: Optional[dict] = None, format_version: int = FORMAT_VERSION,
                 qk_norm: bool = False, sample_from_anchor: bool = True, **kwargs):
        if kind not in DRAFTER_KINDS:
            raise ValueError(f"drafter kind must be one of {', '.join(DRAFTER_KINDS)}, got {kind!r}")
        if head not in DRAFTER_HEADS:
            raise ValueError(f"drafter head must be one of {', '.join(DRAFTER_HEADS)}, got {head!r}")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {num_key_value_heads}")
        self.kind = kind
        self.head = "none" if kind == "medusa" else head
        self.num_layers = num_layers if kind == "dspark" else 0
        self.block_size = block_size
        self.head_rank = head_rank
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = rms_norm_eps
        self.vocab_size = vocab_size
        self.feature_layers = list(feature_layers or [1])
        self.draft_vocab_size = draft_vocab_size
        self.mask_token_id = mask_token_id
        self.initializer_range = initializer_range
        self.target_fingerprint = target_fingerprint
        self.format_version = format_version
        self.qk_norm = bool(qk_norm) and kind == "dspark"  # Medusa has no attention layers
        self.sample_from_anchor = bool(sample_from_anchor) or kind == "medusa"
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @classmethod
    def from_target(cls, section: DrafterConfigSection, target_config, feature_layers: list[int],
                    vocab_size: Optional[int] = None, fingerprint: Optional[dict] = None) -> "DrafterConfig":
        """Architecture from a transformers target config (no weights needed): width, heads/GQA, RoPE θ, norm eps.

        The draft vocabulary is left full: which tokens to keep comes from data (`Drafter.set_draft_vocab`).
        """
        t = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        heads = section.num_attention_heads or t.num_attention_heads
        kv = section.num_key_value_heads or getattr(t, "num_key_value_heads", None) or heads
        if heads % kv:
            kv = heads
        head_dim = getattr(t, "head_dim", None) if section.num_attention_heads is None else None
        rope = getattr(t, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") or getattr(t, "rope_theta", None) or 10000.0
        return cls(kind=section.kind, head=section.head, num_layers=section.num_layers,
                   block_size=section.medusa_heads if section.kind == "medusa" else section.block_size,
                   head_rank=section.head_rank, hidden_size=t.hidden_size,
                   intermediate_size=section.intermediate_size or t.intermediate_size,
                   num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, rope_theta=theta,
                   rms_norm_eps=getattr(t, "rms_norm_eps", 1e-6), vocab_size=vocab_size or t.vocab_size,
                   feature_layers=feature_layers,
                   mask_token_id=section.mask_token_id, target_fingerprint=fingerprint,
                   qk_norm=section.qk_norm, sample_from_anchor=section.sample_from_anchor)
