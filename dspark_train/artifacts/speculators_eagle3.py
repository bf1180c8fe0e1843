"""EAGLE-3 drafters in speculators' `eagle3` format (speculators 0.9.0's Eagle3DraftModel, vLLM 0.32.0's
Eagle3{Llama,Qwen3}ForCausalLM); the tensor list and completeness check are speculators.py's.

Facts this module relies on, read in those sources:
- config.json (`speculators_model_type` "eagle3"): `transformer_layer_config` (qwen3 with per-head q/k norms,
  llama without), `draft_vocab_size`, `target_hidden_size`, `eagle_aux_hidden_state_layer_ids` (the layers
  whose *input* is captured: hidden-state indices, our `feature_layers` unchanged) and the variant flags
  `norm_before_residual`, `norm_before_fc`, `fc_norm`, `norm_output`, all false for our layer: the residual is
  the raw hidden, fc reads the raw features, the un-normed output is fed back.
- The first layer reads cat[input_layernorm(embedding) ; hidden_norm(hidden)] (2d wide q/k/v projections, embedding
  first), adds attention to the hidden, then the usual post_attention_layernorm + MLP: our Eagle3Layer, whose
  names map one to one. Entry t of a sequence pairs token x_{t+1} with the features of position t at RoPE
  position t+1 (speculators' shift_batch), our entry (g_{j−1}, x_j) at position j. Logits = lm_head(norm(h)).
- lm_head.weight [draft_vocab_size, d] is shipped (speculators fills a missing one with NaN), in ascending
  target-id order with `d2t` offsets and the boolean `t2d` when the vocabulary is pruned, as for DSpark.
- embed_tokens.weight is shipped (the target's, which our layer reads frozen): Eagle3DraftModel.from_pretrained
  does not load the verifier's and leaves a missing table randomly initialised (its own checkpoints carry it);
  vLLM uses a shipped table instead of the target's, the same values.
- Our confidence head is not in the format (engines draft by their own rules); the export leaves it out and
  records that in `dspark_train.confidence_head`.
"""
from __future__ import annotations

import torch

from .speculators import SPECULATORS_VERSION, export_vocab, fc_by_layer_order


def eagle3_config(drafter, max_position_embeddings: int, verifier: str) -> dict:
    """config.json of an eagle3 drafter (speculators' Eagle3SpeculatorConfig, what vLLM's eagle3 loaders read)."""
    c = drafter.config
    fp = c.target_fingerprint or {}
    tl = {"model_type": "qwen3" if c.qk_norm else "llama", "hidden_size": c.hidden_size,
          "intermediate_size": c.intermediate_size, "num_hidden_layers": 1,
          "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
          "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
          "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
          "max_position_embeddings": max_position_embeddings, "vocab_size": c.vocab_size,
          "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}
    return {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
            "speculators_version": SPECULATORS_VERSION,
            "speculators_config": {
                "algorithm": "eagle3", "default_proposal_method": "greedy",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.block_size}],
                "verifier": {"name_or_path": verifier, "architectures": [fp.get("architecture", "")]}},
            "transformer_layer_config": tl,
            "draft_vocab_size": c.draft_vocab_size or c.vocab_size,
            "target_hidden_size": fp.get("hidden_size", c.hidden_size),
            "eagle_aux_hidden_state_layer_ids": sorted(c.feature_layers),
            "norm_before_residual": False, "norm_before_fc": False, "fc_norm": False, "norm_output": False,
            "dspark_train": {"target_fingerprint": fp, "format_version": c.format_version,
                             "confidence_head": "not shipped (not in the format); calibration.json is"}}


@torch.no_grad()
def eagle3_tensors(drafter, embed: torch.Tensor, lm: torch.Tensor) -> dict:
    """An eagle3 drafter's state dict in speculators names. `embed`, `lm`: the target's input embedding and LM head
    [V, d]."""
    c = drafter.config
    dt = drafter.conf.weight.dtype
    sd = {k: v.detach() for k, v in drafter.state_dict().items()}
    out = {"fc.weight": fc_by_layer_order(sd["fc.weight"], c.feature_layers),
           "norm.weight": sd["norm.weight"], "embed_tokens.weight": embed.to(dt)}
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.": "self_attn."}
    for k, v in sd.items():
        if k.startswith("layers."):
            for ours, theirs in names.items():
                k = k.replace(ours, theirs, 1) if ours in k else k
            out[k] = v
    ids, _ = export_vocab(drafter)
    if ids is None:  # a copy: a tied target's head is its embedding, which safetensors will not write twice
        out["lm_head.weight"] = lm.to(dt).clone()
    else:
        out["d2t"] = ids - torch.arange(ids.numel(), device=ids.device)
        t2d = torch.zeros(c.vocab_size, dtype=torch.bool, device=ids.device)
        t2d[ids] = True
        out["t2d"] = t2d
        out["lm_head.weight"] = lm[ids.to(lm.device)].to(dt)
    return {k: v.contiguous().cpu() for k, v in out.items()}
