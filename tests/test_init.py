"""`drafter.init: target`: the draft layers are copies of the target layers after the last feature layer, fc selects
that layer's features, the norms are the target's, the confidence starts at the prior; and such a drafter trains."""
import math

import pytest
import torch

from dspark_train.config import DrafterConfigSection, TargetConfig
from dspark_train.drafters import build_drafter
from dspark_train.drafters.init import chosen_layers
from dspark_train.target import load_target

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def target():
    return load_target(TargetConfig(config=TINY, dtype="float32", feature_layers=[1, 2, 3]))


def test_layers_after_the_last_feature_layer_are_chosen():
    assert chosen_layers([1, 8, 14, 20, 27], 30, 1) == ([27], 4)  # SmolLM2: layer 28 reads h(27)
    assert chosen_layers([1, 8, 14, 20, 27], 30, 3) == ([27, 28, 29], 4)
    assert chosen_layers([1, 8, 14, 20, 27], 30, 5) == ([25, 26, 27, 28, 29], 3)  # slides down; fc takes h(20)


@pytest.mark.parametrize("layers", [1, 2])
def test_target_init_copies_the_chosen_layers_and_selects_their_feature(target, layers):
    torch.manual_seed(0)
    d = build_drafter(DrafterConfigSection(num_layers=layers, block_size=4, head_rank=16, init="target",
                                           init_acceptance=0.25), target)
    tl = target.decoder.layers
    for i, layer in enumerate(d.layers):  # feature layers end at 3: draft layer i is target layer 3 + i (0-based)
        src = tl[3 + i]
        assert torch.equal(layer.attn.q_proj.weight, src.self_attn.q_proj.weight)
        assert torch.equal(layer.attn.k_proj.weight, src.self_attn.k_proj.weight)
        assert torch.equal(layer.attn.v_proj.weight, src.self_attn.v_proj.weight)
        assert torch.equal(layer.attn.o_proj.weight, src.self_attn.o_proj.weight)
        assert torch.equal(layer.mlp.gate_proj.weight, src.mlp.gate_proj.weight)
        assert torch.equal(layer.mlp.down_proj.weight, src.mlp.down_proj.weight)
        assert torch.equal(layer.attn_norm.weight, src.input_layernorm.weight)
        assert torch.equal(layer.mlp_norm.weight, src.post_attention_layernorm.weight)
    d64 = torch.eye(64)
    assert torch.equal(d.fc.weight, torch.cat([torch.zeros(64, 128), d64], 1))  # the third feature: h(3)
    assert torch.equal(d.norm.weight, target.decoder.norm.weight)
    assert torch.equal(d.ctx_norm.weight, tl[3].input_layernorm.weight)
    assert d.w2.weight.abs().sum() == 0 and d.conf.weight.abs().sum() == 0
    assert float(torch.sigmoid(d.conf.bias.detach())) == pytest.approx(0.25)
    # functionally: the projected context is the chosen target layer's normed input, so the first draft layer's
    # context keys are that target layer's own keys (before RoPE)
    ids = torch.randint(4, target.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    f = target.forward_features(ids)
    ctx = d.ctx_norm(d.fc(f.features))
    h3 = f.features[..., 128:]
    assert torch.allclose(ctx, tl[3].input_layernorm(h3), atol=1e-6)
    assert torch.allclose(d.layers[0].attn.k_proj(ctx), tl[3].self_attn.k_proj(tl[3].input_layernorm(h3)), atol=1e-5)


def test_random_init_is_unchanged_and_bad_shapes_fail(target):
    torch.manual_seed(0)
    d = build_drafter(DrafterConfigSection(num_layers=1, block_size=4, head_rank=16), target)
    assert not torch.equal(d.layers[0].attn.q_proj.weight, target.decoder.layers[3].self_attn.q_proj.weight)
    assert d.conf.bias.abs().item() < 1 and d.w2.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="intermediate_size"):
        build_drafter(DrafterConfigSection(num_layers=1, block_size=4, head_rank=16, init="target",
                                           intermediate_size=96), target)


def test_a_target_initialised_drafter_trains(target):
    """A few AdamW steps on the DSpark loss against the target's own distribution lower the L1 distance."""
    from dspark_train.losses import block_positions, dspark_loss, position_weights, summarise, target_distribution

    torch.manual_seed(0)
    d = build_drafter(DrafterConfigSection(num_layers=1, block_size=4, head_rank=16, init="target"), target)
    ids = torch.randint(4, target.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    f = target.forward_features(ids)
    anchors = torch.tensor([[2, 9, 17, 30], [5, 12, 22, 33]])
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    pos, rows = block_positions(anchors, valid, 40)
    p_t = target_distribution(f.last_hidden, target.lm_head.weight, pos, None)
    labels = ids.gather(1, (anchors[..., None] + 1 + torch.arange(4)).flatten(1)).view(2, 4, 4)
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=3e-3)
    l1 = []
    for _ in range(15):
        out = d(f.features, f.last_hidden, ids, anchors)
        loss = dspark_loss(out.logits, out.conf_logits, p_t, rows, labels, valid, position_weights(4, 4.0),
                           0.1, 0.9, 1.0)
        l1.append(summarise(loss.sums)["l1"])
        loss.loss.backward()
        opt.step()
        opt.zero_grad()
    assert l1[-1] < 0.8 * l1[0] and all(math.isfinite(x) for x in l1)
