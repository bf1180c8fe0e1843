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
  are copied. A drafter with q/k norms over a Llama layer (the default `qk_norm: true`, which the serving
  engines' draft layers compute) would, with weights of one, rescale every head's q and k to unit RMS and so
  change the copied layer's attention. Their weights are fitted instead (`fit_qk_norm`): the per-dimension
  scales whose attention distributions (RoPE applied, causal) come closest in KL to the target layer's own on
  its activations over `SAMPLE_MESSAGES`. A least-squares fit of the normed q and k to the unnormed ones does
  worse: the per-token spread of rms(k) (attention sinks) is what the norm removes, and matching vector
  scales does not match the softmax over keys. `drafter.qk_norm_init: ones` keeps weights of one (round 2's init).

The target must be Llama-shaped (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input/post-attention RMSNorm)
with the drafter at the target's width, heads and intermediate size (leave those drafter keys unset); anything
else fails naming the mismatch.
"""
from __future__ import annotations

import math

import torch

from .rope import rope_tables, rotate

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
SAMPLE_TOKENS = 384  # at most (a byte-level tokenizer makes thousands of them; the fit's cost grows with T²)
SAMPLE_MESSAGES = [  # activations for fitting q/k norms: chat, math and code, through the target's chat template
    {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                                "clips in May. How many clips did Natalia sell altogether in April and May?"},
    {"role": "assistant", "content": "In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips in "
                                     "April and May. The answer is 72."},
    {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number, and explain it."},
    {"role": "assistant", "content": "```python\ndef fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n"
                                     "        a, b = b, a + b\n    return a\n```\nThe loop keeps the last two "
                                     "numbers of the sequence and advances them n times, so it runs in O(n) time."},
    {"role": "user", "content": "What are some good ways to stay focused while working from home?"},
    {"role": "assistant", "content": "Keep a dedicated workspace, start at a fixed time, plan the day in short "
                                     "blocks with breaks, silence notifications, and end the day with a clear stop."},
]


def chosen_layers(feature_layers: list[int], num_target_layers: int, num_draft_layers: int) -> tuple[list[int], int]:
    """(0-based target layers copied into draft layers 1..n, index in `feature_layers` of the feature fc selects)."""
    start = max(0, min(max(feature_layers), num_target_layers - num_draft_layers))
    below = [i for i, f in enumerate(feature_layers) if f <= start]  # output of layer `start` = its input
    feature = max(below, key=lambda i: feature_layers[i]) if below else 0
    return list(range(start, start + num_draft_layers)), feature


@torch.no_grad()
def init_from_target(drafter, target, acceptance: float, fit_qk: bool = True) -> list[int]:
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
    inputs = None
    for draft_layer, index in zip(drafter.layers, copied):
        theirs = dict(layers[index].named_parameters())
        mine = dict(draft_layer.named_parameters())
        pairs = dict(LAYER_MAP) | {k: v for k, v in OPTIONAL.items() if k in mine and v in theirs}
        if fit_qk and draft_layer.attn.q_norm is not None and "attn.q_norm.weight" not in pairs:
            inputs = sample_hidden_states(target) if inputs is None else inputs
            rope = rope_tables(c.rope_theta, c.head_dim, len(inputs[index]), inputs[index].device)
            fit_qk_norm(draft_layer.attn, layers[index], inputs[index], rope)
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


@torch.no_grad()
def sample_hidden_states(target) -> tuple:
    """The target's hidden states over SAMPLE_MESSAGES: element i is the input of decoder layer i (fp32)."""
    tok = target.tokenizer
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(SAMPLE_MESSAGES, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tok("\n\n".join(m["content"] for m in SAMPLE_MESSAGES))["input_ids"]
    ids = torch.tensor([ids[:SAMPLE_TOKENS]], device=target.device)
    out = target.decoder(input_ids=ids, output_hidden_states=True)
    return tuple(h[0].float() for h in out.hidden_states)


def fit_qk_norm(attn, layer, hidden: torch.Tensor, rope: tuple, steps: int = 300) -> float:
    """Fit `attn.q_norm`/`k_norm` weights (from ones, Adam) to minimise the mean KL(target ‖ draft) of the causal
    attention rows over `hidden` ([T, d], the target layer's input), RoPE applied at positions 0..T−1 as both
    layers apply it. Returns the final KL (nats per query row and head)."""
    with torch.no_grad():
        x = layer.input_layernorm(hidden.to(layer.input_layernorm.weight.dtype)).float()
        T, hd, g = len(x), attn.hd, attn.nh // attn.nkv
        cos, sin = (r[:T, None, :] for r in rope)

        def heads(proj):
            return (x @ proj.weight.float().T).view(T, -1, hd)

        def scores(q, k):
            q, k = rotate(q, cos, sin), rotate(k, cos, sin).repeat_interleave(g, 1)
            return torch.einsum("qhd,khd->hqk", q, k).masked_fill(~causal, float("-inf")) / hd ** 0.5

        q, k = heads(layer.self_attn.q_proj), heads(layer.self_attn.k_proj)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        log_t = scores(q, k).log_softmax(-1)
        qn = q / (q.pow(2).mean(-1, keepdim=True) + attn.q_norm.eps).sqrt()
        kn = k / (k.pow(2).mean(-1, keepdim=True) + attn.k_norm.eps).sqrt()
    wq, wk = (torch.ones(hd, device=x.device, requires_grad=True) for _ in range(2))
    opt = torch.optim.Adam([wq, wk], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            log_d = scores(qn * wq, kn * wk).log_softmax(-1)
            kl = (log_t.exp() * (log_t - log_d)).masked_fill(~causal, 0.0).sum(-1).mean()
            opt.zero_grad()
            kl.backward()
            opt.step()
    with torch.no_grad():
        attn.q_norm.weight.copy_(wq)
        attn.k_norm.weight.copy_(wk)
    return float(kl)
