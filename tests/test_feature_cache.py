"""The feature cache: what it stores equals the online features within the storage precision, a row reads back the
same whichever process wrote it, a changed target / data / format is a different cache, torn shards are ignored.
(Resume mid-epoch with and without the cache: tests/test_train.py.)"""
import json
import shutil

import pytest
import torch

from dspark_train.data import feature_cache as FC
from dspark_train.config import load_recipe
from dspark_train.data.examples import conversations_paths, load_conversations, make_batch, tokenize
from dspark_train.target import load_target


@pytest.fixture(scope="module")
def examples(tiny_recipe, tiny_target):
    convs = load_conversations(conversations_paths(tiny_recipe)[0], 6)
    return tokenize(convs, tiny_target.tokenizer, 128, 4)[0]


def _batch(examples, idx, pad_id):
    return make_batch([examples[i] for i in idx], [0] * len(idx), 8, 4, pad_id)


def _source(recipe, root, target, dtype=torch.float32):
    cache = FC.open_cache(recipe, root, target, conversations_paths(recipe)[0], rank=0)
    return FC.FeatureSource(target, cache, dtype)


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "float32"])
def test_cached_features_equal_online_features_within_storage_precision(fmt, tiny_recipe, tiny_target, examples,
                                                                         tmp_path):
    recipe = load_recipe(tiny_recipe.source, [f"data.feature_cache={fmt}"])
    pad = tiny_target.tokenizer.pad_token_id
    batch = _batch(examples, [0, 1, 2], pad)
    online = tiny_target.forward_features(batch.input_ids, batch.attention_mask)
    first = _source(recipe, tmp_path, tiny_target)(batch)  # a miss: online, rounded, written
    assert len(first[0].shape) == 3 and first[0].shape == online.features.shape
    # a new process (a fresh index over the same directory) reads the rows back, in another batch composition
    fresh = _source(recipe, tmp_path, tiny_target)
    assert fresh.cache.has(examples[0].id) and not fresh.cache.has(examples[3].id)
    again = fresh(_batch(examples, [2, 0, 1], pad))
    order = [1, 2, 0]  # row i of the first batch is row order[i] of the second
    for a, b in zip(first, again):
        assert torch.equal(a, b[order])  # bit-identical: a cached row equals the online row the trainer saw
    assert fresh.cache.hits == 3 and fresh.cache.misses == 0
    mask = batch.attention_mask.bool()
    for got, want in ((first[0], online.features), (first[1], online.last_hidden)):
        got, want = got[mask], want[mask]
        err = (got - want).abs()
        if fmt == "float32":
            assert torch.equal(got, want)
        elif fmt == "bfloat16":  # round to nearest: within half a bf16 ulp (2^-8 relative)
            assert (err <= want.abs() * 2 ** -8 + 1e-30).all()
        else:  # int8 with a per-row absmax scale: within half a step of each (token, layer) row
            d = tiny_target.hidden_size
            rows = want.view(len(want), -1, d)
            step = rows.abs().amax(-1, keepdim=True) / 127
            assert (err.view_as(rows) <= step / 2 + 1e-6).all()
    assert (first[0][~mask] == 0).all()  # padding is zero, as a read gives


def test_bytes_per_token():
    assert FC.bytes_per_token(6, 576, "bfloat16") == 6912  # SmolLM2: 5 feature layers + the last hidden state
    assert FC.bytes_per_token(6, 576, "int8") == 6 * 576 + 6 * 4
    assert FC.bytes_per_token(6, 2560, "bfloat16") == 12 * 2560  # Qwen3-4B: 12·d, DeepSpec's figure


def test_a_changed_target_data_or_format_is_a_different_cache(tiny_recipe, tiny_target, examples, tmp_path):
    pad = tiny_target.tokenizer.pad_token_id
    batch = _batch(examples, [0, 1], pad)
    base = load_recipe(tiny_recipe.source, ["data.feature_cache=bfloat16"])
    src = _source(base, tmp_path, tiny_target)
    src(batch)
    key = src.cache.dir.name
    assert src.cache.has(examples[0].id)
    # another target (an inline config with another seed): another key; this run's cache root drops the old one
    other = load_recipe(tiny_recipe.source, ["data.feature_cache=bfloat16", "target.seed=1"])
    other_target = load_target(other.target)
    moved = _source(other, tmp_path, other_target)
    assert moved.cache.dir.name != key and not moved.cache.has(examples[0].id)
    assert not (tmp_path / key).exists()
    # other feature layers, another format: other keys
    layers = load_recipe(tiny_recipe.source, ["data.feature_cache=bfloat16", "target.feature_layers=[1,2]"])
    assert _source(layers, tmp_path, load_target(layers.target)).cache.dir.name not in (key, moved.cache.dir.name)
    int8 = load_recipe(tiny_recipe.source, ["data.feature_cache=int8"])
    assert _source(int8, tmp_path, tiny_target).cache.dir.name != key
    # changed data: a conversations file with one answer edited
    data = tmp_path / "convs.jsonl"
    lines = conversations_paths(base)[0].read_text().splitlines()
    rec = json.loads(lines[0])
    rec["conversations"][-1]["content"] += " (edited)"
    data.write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    edited = load_recipe(tiny_recipe.source, ["data.feature_cache=bfloat16", f"data.conversations={data}"])
    cache = FC.open_cache(edited, tmp_path / "again", tiny_target, data, rank=0)
    assert cache.dir.name != key
    # a shared root keeps every key (other runs may use them)
    shared = tmp_path / "shared"
    a = FC.open_cache(base, shared, tiny_target, conversations_paths(base)[0], 0)
    FC.FeatureCache(shared, "other-key", {}, "bfloat16", owns_root=False)
    assert (shared / "other-key").is_dir() and a.dir.is_dir()
    manifest = json.loads((a.dir / "manifest.json").read_text())
    assert manifest["format"] == "bfloat16" and manifest["target"]["feature_layers"] == tiny_target.feature_layers
    assert len(manifest["data"]["conversations_sha256"]) == 64


def test_the_key_holds_the_resolved_precision_not_the_recipe_string(tiny_recipe, tmp_path):
    """[S] item 2: `target.dtype: auto` is bf16 on a CPU with AMX/AVX512-BF16 and fp32 on an AVX2 one; a cache
    (shared root, or a run resumed on another machine kind) must not mix features computed in the two."""
    auto = load_recipe(tiny_recipe.source, ["data.feature_cache=bfloat16", "target.dtype=auto"])
    data = conversations_paths(auto)[0]
    keys = {}
    for dtype in ("bfloat16", "float32"):  # what `auto` resolves to on the two machine kinds
        target = load_target(load_recipe(tiny_recipe.source, [f"target.dtype={dtype}"]).target)
        keys[dtype] = FC.open_cache(auto, tmp_path, target, data, 0).dir.name
        pinned = load_recipe(tiny_recipe.source, ["data.feature_cache=bfloat16", f"target.dtype={dtype}"])
        assert FC.open_cache(pinned, tmp_path, target, data, 0).dir.name == keys[dtype]  # same numbers, same key
    assert keys["bfloat16"] != keys["float32"]


def test_torn_or_foreign_shards_are_ignored_and_recomputed(tiny_recipe, tiny_target, examples, tmp_path):
    recipe = load_recipe(tiny_recipe.source, ["data.feature_cache=bfloat16"])
    pad = tiny_target.tokenizer.pad_token_id
    src = _source(recipe, tmp_path, tiny_target)
    src(_batch(examples, [0], pad))
    (shard,) = src.cache.dir.glob("shard-*.safetensors")
    shutil.copy(shard, src.cache.dir / "shard-r1-torn.safetensors")
    with open(src.cache.dir / "shard-r1-torn.safetensors", "r+b") as f:
        f.truncate(40)  # a kill mid-write cannot leave this (temp file + rename), a crash of the disk can
    (src.cache.dir / ".shard-r0-x.safetensors.tmp-99.safetensors").write_bytes(b"partial")
    fresh = _source(recipe, tmp_path, tiny_target)
    assert fresh.cache.has(examples[0].id) and len(fresh.cache.entries) == 1
    fresh(_batch(examples, [1], pad))
    assert fresh.cache.misses == 1 and fresh.cache.has(examples[1].id)
