"""`data.capture_features`: `dspark data` keeps the target's features of what it generates, and the trainer's
feature source reads them as it would have computed them online (within the storage format)."""
import json
import weakref

import pytest
import torch

from dspark_train.config import RecipeError, load_recipe
from dspark_train.data import examples as D
from dspark_train.data import generate as G
from dspark_train.data import regenerate as R
from dspark_train.data.capture import open_staging
from dspark_train.data.feature_cache import FeatureSource, decode, encode, open_cache
from dspark_train.layout import RunDir


def _recipe(tmp_path, repo, fmt, *extra, shared=True, prompts=None):
    from conftest import REGEN_PROMPTS
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts or REGEN_PROMPTS))
    # 6 new tokens: answers are cut, so the end of each conversation is computed past what generate fed
    return load_recipe(repo / "recipes" / "tiny.yaml", [
        f"data.prompts={path}", "data.conversations=null", f"data.output={tmp_path / 'out.jsonl'}",
        "data.max_new_tokens=6", "data.gen_batch_size=2", "data.max_seq_len=128", "data.max_prompts=null",
        "data.capture_features=true", f"data.feature_cache={fmt}", f"train.output_dir={tmp_path / 'run'}",
        f"data.feature_cache_dir={tmp_path / 'fc' if shared else 'null'}", *extra])


def _online_rows(target, ids):
    return target.forward_features(torch.tensor([ids])).rows()[0]


@pytest.mark.parametrize("fmt, shared", [("float32", True), ("bfloat16", False)])
def test_captured_features_are_the_targets_features_of_the_trainers_sequences(tmp_path, repo, tiny_target, fmt,
                                                                              shared, capsys):
    """Shared: under data.feature_cache_dir; not shared: in the run's own cache, which the trainer cleans of
    other keys but not of the staged captures."""
    recipe = _recipe(tmp_path, repo, fmt, shared=shared)
    out = R.run_data(recipe, target=tiny_target)
    assert "training with this recipe reads them" in capsys.readouterr().out
    convs = D.load_conversations(out)
    assert [c["id"] for c in convs] == ["p0", "p1", "p3", "p5"]  # p3: two turns, the second over the first answer
    cache = open_cache(recipe, RunDir(tmp_path / "run").feature_cache, tiny_target, D.conversations_paths(recipe), 0)
    assert cache.dir.parent == (tmp_path / "fc" if shared else RunDir(tmp_path / "run").feature_cache)
    assert set(cache.entries) == {"p0", "p1", "p3", "p5"}
    assert any(d.name.startswith("capture-") for d in cache.dir.parent.iterdir())
    examples, _ = D.tokenize(convs, tiny_target.tokenizer, recipe.data.max_seq_len, 1)
    for e in examples:
        stored = cache.read(e.id, torch.float32)
        online = decode(encode(_online_rows(tiny_target, e.input_ids), fmt), torch.float32)
        assert stored.shape == online.shape == (len(e.input_ids), 4, 64)
        if fmt == "float32":  # the same numbers up to the order of fp32 sums (batched, cached decoding)
            torch.testing.assert_close(stored, online, rtol=1e-5, atol=1e-5)
        else:  # at most one bf16 rounding step apart (a value at a rounding boundary may land on either side)
            ulp = torch.maximum(online.abs(), stored.abs()) * 2 ** -7
            assert ((stored - online).abs() <= ulp + 1e-6).all()
    # the trainer's feature source: a batch of captured sequences reads the cache, runs no target forward
    source = FeatureSource(tiny_target, cache, torch.float32)
    batch = D.make_batch(examples[:2], [0, 1], 4, recipe.drafter.block_size - 1, tiny_target.tokenizer.pad_token_id)
    calls = []
    handle = tiny_target.decoder.register_forward_hook(lambda *a: calls.append(1))
    feats, last = source(batch)
    handle.remove()
    assert not calls and cache.hits == 2 and cache.misses == 0
    ref = FeatureSource(tiny_target, None, torch.float32)(batch)
    m = batch.attention_mask[:, :, None].bool()
    tol = dict(rtol=1e-5, atol=1e-5) if fmt == "float32" else dict(rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(feats * m, ref[0] * m, **tol)
    torch.testing.assert_close(last * m, ref[1] * m, **tol)


def test_a_rerun_adds_only_what_it_generates_and_a_replaced_output_drops_the_staged_features(tmp_path, repo,
                                                                                              tiny_target):
    recipe = _recipe(tmp_path, repo, "bfloat16")
    out = R.run_data(recipe, target=tiny_target)
    staged = open_staging(recipe, tiny_target, out, 0, {"p0", "p1", "p3", "p5"})
    assert set(staged.entries) == {"p0", "p1", "p3", "p5"}
    shards = sorted(staged.dir.glob("shard-*"))
    R.run_data(recipe, target=tiny_target)  # nothing to answer: nothing captured again
    assert sorted(staged.dir.glob("shard-*")) == shards
    # the output replaced (its answers may differ now): the staged features no longer belong to it
    assert not open_staging(recipe, tiny_target, out, 0, set()).entries


def test_no_generate_cache_outlives_its_turn(tmp_path, repo, tiny_target, monkeypatch):
    """A one-turn and a two-turn conversation in one batch: the first's rows go to the host in turn 0 and turn 0's
    KV cache is gone before turn 1 generates; turn 1's is gone when the batch is written. Stored rows own their
    memory (a view of the batch's rows would keep all of them alive)."""
    caches, alive = [], []
    generate = tiny_target.model.generate

    def spy(*a, **k):
        alive.append([c() is not None for c in caches])
        out = generate(*a, **k)
        caches.append(weakref.ref(out.cache))
        return out
    monkeypatch.setattr(tiny_target.model, "generate", spy)
    prompts = [{"id": "one", "category": "chat", "turns": ["Say hi."]},
               {"id": "two", "category": "chat", "turns": ["Tell me a story.", "Shorter."]}]
    R.run_data(_recipe(tmp_path, repo, "float32", prompts=prompts), target=tiny_target)
    assert alive == [[], [False]] and caches[1]() is None
    # an answer cut by data.max_seq_len inside what generate fed: its rows are a slice of the batch's
    batch = [{"id": "one", "category": "chat", "raw": prompts[0]}, {"id": "x", "category": "chat", "raw": prompts[0]}]
    _, features = G.answer_batch(tiny_target, batch, _recipe(tmp_path, repo, "float32", "data.max_seq_len=28"))
    assert [rows.shape[0] for _, rows in features] == [28, 28]
    assert all(rows.untyped_storage().nbytes() == rows.numel() * rows.element_size() for _, rows in features)


@pytest.mark.parametrize("override, key", [
    ("data.feature_cache='off'", "data.feature_cache"),
    ("data.conversations=[distill/smollm2-135m-instruct.jsonl]", "data.conversations"),
    ("data.server.url=http://localhost:8000", "data.server.url"),
])
def test_capture_refuses_a_recipe_the_trainer_would_not_read_it_from(tmp_path, repo, override, key):
    with pytest.raises(RecipeError, match=f"{key}: data.capture_features is on"):
        _recipe(tmp_path, repo, "bfloat16", override)
