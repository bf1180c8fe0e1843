"""Data: regeneration (resume, order, failures, shards), tokenisation, held-out split, anchors, block labels, order."""
import dataclasses
import json

import pytest
import torch

from dspark_train.data import examples as D
from dspark_train.data import regenerate as R
from dspark_train.data import vocab as V
from dspark_train.data.chat import conversation_ids, prompt_ids, stop_token_ids
from dspark_train.config import RecipeError, load_recipe
from dspark_train.evaluation.evaluate import generation_kwargs
from dspark_train.target import load_target, load_tokenizer

CONVS = [
    {"id": "a", "conversations": [{"role": "user", "content": "hi there"},
                                  {"role": "assistant", "content": "hello, how can I help you today?"}]},
    {"id": "b", "conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {"id": "c", "conversations": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "first answer"},
                                  {"role": "user", "content": "q2"}, {"role": "assistant", "content": "second one"}]},
]


# --------------------------------------------------------------------------- tokenisation and split
def test_tokenize_masks_assistant_spans_and_drops_short(tiny_target):
    tok = tiny_target.tokenizer
    examples, dropped = D.tokenize(CONVS, tok, max_len=512, block_size=4)
    assert [e.id for e in examples] == ["a", "c"] and dropped == 1  # "4<|im_end|>" is 2 tokens < 1 block (5)
    a = examples[0]
    ids, mask = conversation_ids(tok, CONVS[0]["conversations"], 512)
    assert (a.input_ids, a.loss_mask) == (ids, mask)
    supervised = tok.decode([i for i, m in zip(a.input_ids, a.loss_mask) if m])
    assert supervised.startswith("hello, how can I help you today?") and "hi there" not in supervised
    c = examples[1]
    text = tok.decode([i for i, m in zip(c.input_ids, c.loss_mask) if m])
    assert "first answer" in text and "second one" in text and "q2" not in text
    short, _ = D.tokenize(CONVS[:1], tok, max_len=20, block_size=4)
    assert not short or len(short[0].input_ids) == 20


def test_heldout_split_is_deterministic_and_order_free():
    items = [{"id": f"x{i}"} for i in range(50)]
    train, held = D.split_heldout(items, 7, seed=3)
    assert len(held) == 7 and len(train) == 43 and not {x["id"] for x in held} & {x["id"] for x in train}
    train2, held2 = D.split_heldout(list(reversed(items)), 7, seed=3)
    assert {x["id"] for x in held2} == {x["id"] for x in held}
    assert [x["id"] for x in train] == [x["id"] for x in items if x not in held]  # file order kept
    _, held3 = D.split_heldout(items, 7, seed=4)
    assert {x["id"] for x in held3} != {x["id"] for x in held}


# --------------------------------------------------------------------------- anchors and labels
def test_anchors_only_where_anchor_and_next_are_supervised():
    mask = [0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0]
    cand = D.anchor_candidates(torch.tensor(mask)).tolist()
    assert cand == [2, 3, 6, 7, 8]
    a = D.sample_anchors(mask, 3, seed=5)
    assert len(a) == 3 and set(a.tolist()) <= set(cand) and a.tolist() == sorted(a.tolist())
    assert torch.equal(a, D.sample_anchors(mask, 3, seed=5))
    assert D.sample_anchors(mask, 10, seed=5).tolist() == cand
    assert D.sample_anchors(mask, 2, seed=None).tolist() == [2, 8]  # evaluation: evenly spread, no randomness


def test_block_labels_supervise_the_contiguous_valid_prefix():
    ids = torch.arange(10, 20).view(1, 10)
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 1, 1]])
    anchors = torch.tensor([[1, 6, 8, -1]])
    labels, valid = D.block_labels(ids, mask, anchors, gamma=3, pad_id=0)
    assert valid.tolist() == [[[True, True, False], [True, True, True], [True, False, False],
                               [False, False, False]]]
    assert labels[0, 0].tolist() == [12, 13, 0]  # slot k of anchor p is labelled ids[p+k+1]
    assert labels[0, 1].tolist() == [17, 18, 19]
    assert labels[0, 2].tolist() == [19, 0, 0]  # runs off the end of the sequence


def _examples(n):
    return [D.Example(str(i), list(range(3, 3 + 10 + i)), [0, 0] + [1] * (8 + i)) for i in range(n)]


def test_global_order_is_world_size_independent(tiny_recipe):
    exs = _examples(10)
    order = D.GlobalOrder(len(exs), seed=1)
    epoch0 = sorted(order(p)[1] for p in range(10))
    assert epoch0 == list(range(10)) and order(10)[0] == 1
    whole = D.train_batch(exs, order, 4, 4, tiny_recipe, gamma=4, pad_id=0)
    halves = [D.train_batch(exs, D.GlobalOrder(len(exs), seed=1), s, 2, tiny_recipe, gamma=4, pad_id=0)
              for s in (4, 6)]
    for name in ("anchor_pos", "labels", "valid"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(h, name) for h in halves]))
    for row, h, j in ((0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)):
        n = int(halves[h].attention_mask[j].sum())
        assert torch.equal(whole.input_ids[row, :n], halves[h].input_ids[j, :n])


def test_length_grouped_order_visits_each_example_once_in_short_padded_batches(tiny_recipe):
    """Each epoch is still a permutation; micro-batches hold similar lengths (far less padding than random ones);
    the mapping depends on the global position only, so two ranks reading halves see what one rank sees."""
    lengths = [int(x) for x in torch.randint(10, 500, (300,), generator=torch.Generator().manual_seed(0))]
    plain = D.GlobalOrder(300, seed=1)
    grouped = D.GlobalOrder(300, seed=1, lengths=lengths, chunk=64, granule=4)
    for epoch in (0, 1):
        assert sorted(grouped(epoch * 300 + p)[1] for p in range(300)) == list(range(300))

    def padding(order):
        batches = [[lengths[order(p)[1]] for p in range(s, s + 4)] for s in range(0, 300, 4)]
        return sum(4 * max(b) - sum(b) for b in batches) / sum(lengths)
    assert padding(grouped) < 0.25 * padding(plain)
    again = D.GlobalOrder(300, seed=1, lengths=lengths, chunk=64, granule=4)
    assert [again(p) for p in range(600)] == [grouped(p) for p in range(600)]
    assert [grouped(p)[1] for p in range(64)] != sorted((grouped(p)[1] for p in range(64)), key=lambda i: lengths[i])


def test_conversations_from_several_files_and_duplicate_ids_refused(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    a.write_text("".join(json.dumps({"id": i, "conversations": conv}) + "\n" for i in ("1", "2")))
    b.write_text(json.dumps({"id": "3", "conversations": conv}) + "\n")
    assert [c["id"] for c in D.load_conversations([a, b])] == ["1", "2", "3"]
    b.write_text(json.dumps({"id": "2", "conversations": conv}) + "\n")
    with pytest.raises(D.DataFileError, match="b.jsonl: id '2' is also in .*a.jsonl"):
        D.load_conversations([a, b])


def test_eval_batches_cover_heldout_once_with_equal_counts():
    exs = _examples(5)
    per_rank = [D.eval_batches(exs, 2, r, 2, anchors=4, gamma=3, pad_id=0) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    rows = [(b, j) for bs in per_rank for b in bs for j in range(2)]
    real = [b.input_ids[j][b.attention_mask[j].bool()].tolist() for b, j in rows if b.attention_mask[j].any()]
    assert sorted(real) == sorted(e.input_ids for e in exs)  # each held-out sequence exactly once
    pads = [(b, j) for b, j in rows if not b.attention_mask[j].any()]
    assert len(pads) == 3 and all((b.anchor_pos[j] == -1).all() and not b.valid[j].any() for b, j in pads)


def test_draft_vocab_keeps_specials_and_bytes_then_most_frequent(tiny_target):
    tok = tiny_target.tokenizer
    counts = torch.zeros(len(tok), dtype=torch.long)
    vocab = V.select_draft_vocab(counts, 10, tok)  # all tokens are specials or bytes in the tiny tokenizer
    assert len(vocab) == 10 and set(tok.all_special_ids) <= set(vocab.tolist())

    class Tok:  # a vocabulary with two specials and non-byte tokens, so frequency decides the rest
        all_special_ids = [0, 1]

        def get_vocab(self):
            return {"<s>": 0, "</s>": 1, **{f"tok{i}": i for i in range(2, 20)}}
    counts = torch.zeros(20, dtype=torch.long)
    counts[[7, 12, 5]] = torch.tensor([50, 40, 40])
    assert V.select_draft_vocab(counts, 5, Tok()).tolist() == [0, 1, 5, 7, 12]
    lc = V.label_counts([D.Example("x", [4, 5, 5, 6], [0, 1, 1, 0])], 8)
    assert lc.tolist() == [0, 0, 0, 0, 0, 2, 0, 0]


# --------------------------------------------------------------------------- regeneration
def _gen_recipe(tmp_path, repo, *extra, prompts=None):
    from conftest import REGEN_PROMPTS
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts or REGEN_PROMPTS))
    return load_recipe(repo / "recipes" / "tiny.yaml", [
        f"data.prompts={path}", "data.conversations=null", f"data.output={tmp_path / 'out.jsonl'}",
        "data.max_new_tokens=6", "data.gen_batch_size=2", "data.max_seq_len=128", "data.max_prompts=null", *extra])


@pytest.fixture()
def gen_recipe(tmp_path, repo):
    return _gen_recipe(tmp_path, repo)


def _count_generate(target, monkeypatch):
    calls = []
    orig = target.model.generate

    def spy(*a, **k):
        calls.append(k["input_ids"].shape[0])
        return orig(*a, **k)
    monkeypatch.setattr(target.model, "generate", spy)
    return calls


def test_run_data_resumes_keeps_order_and_records_failures(gen_recipe, tiny_target, monkeypatch, tmp_path):
    calls = _count_generate(tiny_target, monkeypatch)
    out = R.run_data(gen_recipe, target=tiny_target)
    recs = D.read_jsonl(out)
    assert [r["id"] for r in recs] == ["p0", "p1", "p3", "p5"]
    assert recs[2]["conversations"][2] == {"role": "user", "content": "Shorter."}
    assert [m["role"] for m in recs[2]["conversations"]] == ["user", "assistant"] * 2
    assert all(r["conversations"][1]["content"] for r in recs)
    fails = {r["id"]: r["error"] for r in D.read_jsonl(out.with_name(out.name + ".failures.jsonl"))}
    assert set(fails) == {"bad", "long"} and "max_seq_len" in fails["long"]
    assert calls and max(calls) <= 2  # batched by data.gen_batch_size
    n_calls = len(calls)
    # a rerun skips every answered id; only the failures are retried (and fail again)
    assert R.run_data(gen_recipe, target=tiny_target) == out
    assert len(calls) == n_calls
    assert [r["id"] for r in D.read_jsonl(out)] == ["p0", "p1", "p3", "p5"]
    # the merged file is what training reads
    convs = D.load_conversations(out)
    assert [c["id"] for c in convs] == ["p0", "p1", "p3", "p5"]
    # a kill while writing p5: its line in the shard part is torn and it never reached the merged file
    part = out.with_name(out.name + ".part-0-of-1")
    lines = part.read_text().splitlines()
    p5 = next(x for x in lines if '"id": "p5"' in x)
    part.write_text("".join(x + "\n" for x in lines if x != p5) + p5[:25])
    D.write_jsonl_atomic(out, [r for r in D.read_jsonl(out) if r["id"] != "p5"])
    R.run_data(gen_recipe, target=tiny_target)
    assert len(calls) == n_calls + 1  # only p5 is generated again
    assert [r["id"] for r in D.read_jsonl(out)] == ["p0", "p1", "p3", "p5"]
    assert all(x == "" or json.loads(x) for x in part.read_text().splitlines()[len(lines):])


def test_run_data_shards_merge_in_prompt_order(gen_recipe, tiny_target, capsys):
    out = D.output_path(gen_recipe)
    R.run_data(gen_recipe, shard="1/2", target=tiny_target)
    assert not out.exists()  # shard 0 has not run yet
    R.run_data(gen_recipe, shard="0/2", target=tiny_target)
    assert [r["id"] for r in D.read_jsonl(out)] == ["p0", "p1", "p3", "p5"]
    with pytest.raises(Exception, match="I/N"):
        R.parse_shard("3")


def test_run_data_with_existing_conversations_generates_nothing(tiny_recipe, capsys):
    path = R.run_data(tiny_recipe)
    assert path.name == "smollm2-135m-instruct.jsonl" and "using existing conversations" in capsys.readouterr().out


# --------------------------------------------------------------------------- where a turn ends, which law samples it
def test_stop_token_ids_add_the_templates_end_of_turn(tiny_recipe, tiny_target, eot_tokenizer_dir):
    from transformers import GenerationConfig
    chatml = tiny_target.tokenizer  # ChatML: <|im_end|> is both its EOS and its end of turn
    assert stop_token_ids(chatml) == stop_token_ids(chatml, tiny_target.model.generation_config) == [
        chatml.convert_tokens_to_ids("<|im_end|>")]
    tok = load_tokenizer(dataclasses.replace(tiny_recipe.target, tokenizer=str(eot_tokenizer_dir)))
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    assert eos != eot and stop_token_ids(tok) == [eos, eot]  # Llama-3 style: EOS ends the text, not the turn
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[7, eot])) == [7, eot, eos]


def test_answers_stop_where_the_targets_turn_ends_not_at_eos_only(tmp_path, repo, eot_tokenizer_dir):
    """A target whose tokenizer's EOS (<|end_of_text|>) is not its end of turn (<|eot_id|>, Llama-3 style): the
    answer ends at <|eot_id|> and is finished; what the target invents past it (a next turn) is not folded into the
    stored text by skip_special_tokens."""
    recipe = _gen_recipe(tmp_path, repo, f"target.tokenizer={eot_tokenizer_dir}", "data.temperature=0",
                         "data.max_new_tokens=12", prompts=[{"id": "q", "category": "chat", "turns": ["Say hi."]}])
    target = load_target(dataclasses.replace(
        recipe.target, config={**recipe.target.config, "tie_word_embeddings": False}))
    tok, model = target.tokenizer, target.model
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": "Say hi."}])])

    def eos_only():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[tok.eos_token_id],
                             pad_token_id=tok.pad_token_id)
        return out[0, ids.shape[1]:].tolist()
    plain, eot, row = eos_only(), tok.convert_tokens_to_ids("<|eot_id|>"), model.lm_head.weight
    for k in range(1, 8):  # <|eot_id|>'s output row a hair above the row of the k-th token: the turn ends there
        with torch.no_grad():
            row[eot] = row[plain[k]] * 1.001
        ended = eos_only()
        if ended[:k + 1] == plain[:k] + [eot] and set(ended[k + 1:]) - set(tok.all_special_ids):
            break
    else:
        pytest.fail(f"no k makes the random target end its turn after k tokens and go on: {plain}")
    # with EOS alone, generation runs on past the end of the turn into text that skip_special_tokens would keep
    rec = D.read_jsonl(R.run_data(recipe, target=target))[0]
    assert rec["conversations"][1]["content"] == tok.decode(plain[:k], skip_special_tokens=True).strip()
    assert rec["finished"] and rec["n_tokens"] == k
    # `dspark eval` (plain decoding and the speculative decoder it is compared with) stops at the same ids
    assert generation_kwargs(target)["eos_token_id"] == stop_token_ids(tok, model.generation_config) == [
        tok.eos_token_id, eot]


def test_in_process_sampling_is_the_recipes_law_alone(tmp_path, repo, tiny_target, monkeypatch):
    """transformers fills what `generate` is not given from the model's generation_config, then its own defaults
    (top_k=50): the recipe's temperature, top_k and top_p must be all that is applied, and every record says so."""
    gc = tiny_target.model.generation_config
    for key, value in (("top_k", 20), ("repetition_penalty", 1.3), ("min_p", 0.1)):  # a model's own defaults
        monkeypatch.setattr(gc, key, value)
    built, orig = [], tiny_target.model._get_logits_processor

    def spy(generation_config, *a, **k):
        procs = orig(generation_config, *a, **k)
        built.append([(type(p).__name__, getattr(p, "top_k", None)) for p in procs])
        return procs
    monkeypatch.setattr(tiny_target.model, "_get_logits_processor", spy)
    for top_k, want in ((0, []), (5, [("TopKLogitsWarper", 5)])):
        (tmp_path / str(top_k)).mkdir()
        recipe = _gen_recipe(tmp_path / str(top_k), repo, "data.temperature=0.7", "data.top_p=0.9",
                             f"data.top_k={top_k}")
        built.clear()
        recs = D.read_jsonl(R.run_data(recipe, target=tiny_target))
        assert built and all(b == [("TemperatureLogitsWarper", None), *want, ("TopPLogitsWarper", None)]
                             for b in built)
        assert recs and all(r["sampling"] == {"temperature": 0.7, "top_p": 0.9, "top_k": top_k} for r in recs)
    # resuming that output under another law would mix two laws in one file
    D.write_jsonl_atomic(D.output_path(recipe), recs[:1])
    with pytest.raises(RecipeError, match=r"data.temperature/top_k/top_p: .*out.jsonl holds answers sampled with "
                                          r"\{'temperature': 0.7, 'top_p': 0.9, 'top_k': 5\} \(id 'p0'\), this "
                                          r"recipe samples \{'temperature': 0.7, 'top_p': 0.9, 'top_k': 0\}"):
        R.run_data(_gen_recipe(tmp_path / "5", repo, "data.temperature=0.7", "data.top_p=0.9"), target=tiny_target)
