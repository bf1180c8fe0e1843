"""`drafter.init: target`: start a DSpark drafter from the target's own weights instead of random ones.

Which layers: the target layers right after the last feature layer. With feature layers ending at layer ℓ
(1-based output index; never the final layer), target layer ℓ+1 is the one whose input is h(ℓ), the deepest
hidden state the drafter sees, and layers ℓ+1..L are what turns it into the next-token distribution. So draft
layer i starts as a copy of target layer ℓ+i (0-based index ℓ+i−1; if the drafter has more layers than remain,
the window slides down to end at the last layer). Then:
- `fc` selects the feature the first copied layer reads (identity on that layer's block of the concatenated
  features, zero elsewhere), and `ctx_norm` is that layer's input RMSNorm: the projected context is exactly
  RMSNorm(h(ℓ)), so at step 0 the first draft layer's context keys and values are the target layer's own.
- `norm` is the target's final norm, so the LM head (shared, frozen) reads what it reads in the target.
- The Markov head's W2 starts at zero (its bias adds nothing until it learns something), so the first drafts are
  the copied layer's own distribution; W1 and the MASK embedding stay random (nothing in the target matches).
- The confidence head's weight starts at zero and its bias at logit(`drafter.init_acceptance`), the expected
  per-slot acceptance, so the first confidences are that prior rather than σ(noise).
- Per-head q/k norms, when both the draft layer and the target layer have them (`q_norm`/`k_norm`, as Qwen3),
  are copied; a drafter with q/k norms over a Llama layer keeps them at ones (identity at the start).

The target must be Llama-shaped (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input/post-attention RMSNorm)
with the drafter at the target's width, heads and intermediate size (leave those drafter keys unset); anything
else fails naming the mismatch.
"""
from __future__ import annotations

import math

import torch

LAYER_MAP = {  # draft layer parameter -> target decoder layer parameter (Llama naming)
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
OPTIONAL = {"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}


def chosen_layers(feature_layers: list[int], num_target_layers: int, num_draft_layers: int) -> tuple[list[int], int]:
    """(0-based target layers copied into draft layers 1..n, index in `feature_layers` of the feature fc selects)."""
    start = max(0, min(max(feature_layers), num_target_layers - num_draft_layers))
    below = [i for i, f in enumerate(feature_layers) if f <= start]  # output of layer `start` = its input
    feature = max(below, key=lambda i: feature_layers[i]) if below else 0
    return list(range(start, start + num_draft_layers)), feature


@torch.no_grad()
def init_from_target(drafter, target, acceptance: float) -> list[int]:
    """Copy the target's weights into `drafter` as the module docstring says; returns the target layers used."""
    c = drafter.config
    if c.kind != "dspark":
        raise ValueError(f"drafter.init: target needs kind dspark, got {c.kind!r}")
    if not 0 < acceptance < 1:
        raise ValueError(f"drafter.init_acceptance: must be in (0, 1), got {acceptance}")
    layers = target.decoder.layers
    copied, feature = chosen_layers(c.feature_layers, len(layers), c.num_layers)
    if copied[-1] >= len(layers):
        raise ValueError(f"drafter.init: target has {len(layers)} layers, fewer than drafter.num_layers {c.num_layers}")
    for draft_layer, index in zip(drafter.layers, copied):
        theirs = dict(layers[index].named_parameters())
        mine = dict(draft_layer.named_parameters())
        pairs = dict(LAYER_MAP) | {k: v for k, v in OPTIONAL.items() if k in mine and v in theirs}
        for name, source in pairs.items():
            if source not in theirs:
                raise ValueError(f"drafter.init: target layer {index} has no {source} (a Llama-shaped layer is needed)")
            if mine[name].shape != theirs[source].shape:
                raise ValueError(f"drafter.init: {name} is {tuple(mine[name].shape)} but target layer {index}'s "
                                 f"{source} is {tuple(theirs[source].shape)}; leave drafter.intermediate_size / "
                                 "num_attention_heads / num_key_value_heads unset")
            mine[name].copy_(theirs[source])
    d = c.hidden_size
    drafter.fc.weight.zero_()
    drafter.fc.weight[:, feature * d:(feature + 1) * d] = torch.eye(d)
    drafter.ctx_norm.weight.copy_(layers[copied[0]].input_layernorm.weight)
    drafter.norm.weight.copy_(target.decoder.norm.weight)
    if c.head != "none":
        drafter.w2.weight.zero_()
    drafter.conf.weight.zero_()
    drafter.conf.bias.fill_(math.log(acceptance / (1 - acceptance)))
    return copied
