"""Eval harness: metrics from scripted traces, benchmark errors, the report schema, an end-to-end run."""
import argparse
import json

import pytest
import torch

from dspark_train.cli import add_arguments, eval_config
from dspark_train.cli import main as cli_main
from dspark_train.config import RecipeError, TargetConfig
from dspark_train.evaluation.evaluate import (PLAIN, Benchmark, BenchmarkError, EvalConfig, build_report,
                                              generation_kwargs, hf_method, load_benchmark, measure, plain_name)
from dspark_train.hardware import cpu_info
from dspark_train.evaluation.report import RoundStat, acceptance_metrics, first_divergence, write_report

TOP_LEVEL = ("target", "drafter", "device", "device_name", "machine", "dtype", "dtype_choice", "temperature", "mode",
             "benchmarks")
PER_BENCHMARK = ("n_prompts", "tau", "accept_rate_by_position", "conditional_accept_by_position", "verify_rate",
                 "tokens_per_s", "baseline_tokens_per_s", "speedup", "plain_tokens_per_s_by_dtype", "fastest_plain",
                 "speedup_vs_fastest_plain", "lossless", "agreement", "divergences", "baselines")


def eval_args(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p, EvalConfig)
    return eval_config(p.parse_args(["artifact", "--no-progress", *argv]))


# --------------------------------------------------------------------------- metrics
def test_acceptance_from_scripted_trace():
    # γ = 4 drafts per round, anchor + 4 drafts verified; accepted 4, 0, 2, 1
    rounds = [RoundStat(verified=5, accepted=a, depth=4) for a in (4, 0, 2, 1)]
    m = acceptance_metrics(rounds)
    assert m["tau"] == pytest.approx((5 + 1 + 3 + 2) / 4)
    assert m["accept_rate_by_position"] == pytest.approx([3 / 4, 2 / 4, 1 / 4, 1 / 4])
    assert m["conditional_accept_by_position"] == pytest.approx([3 / 4, 2 / 3, 1 / 2, 1 / 1])
    assert m["verify_rate"] == pytest.approx(11 / 20)
    assert m["rounds"] == 4


def test_acceptance_with_varying_depth_counts_only_verified_positions():
    # adaptive depth: a round that verified 2 positions says nothing about position 3
    rounds = [RoundStat(3, 2, 2), RoundStat(5, 3, 4), RoundStat(2, 0, 1)]
    m = acceptance_metrics(rounds)
    assert m["tau"] == pytest.approx((3 + 4 + 1) / 3)
    assert m["accept_rate_by_position"] == pytest.approx([2 / 3, 2 / 2, 1 / 1, 0 / 1])
    assert m["conditional_accept_by_position"] == pytest.approx([2 / 3, 2 / 2, 1 / 1, 0 / 1])
    assert m["verify_rate"] == pytest.approx(8 / 10)
    assert acceptance_metrics([])["tau"] is None


def test_per_source_acceptance_from_scripted_hybrid_rounds():
    """Accepted / verified nodes per source, each source's share of accepted draft tokens."""
    rounds = [RoundStat(6, 3, 3, {"drafter": [2, 1], "copy": [2, 1], "both": [1, 1]}),
              RoundStat(4, 2, 3, {"copy": [3, 2]}, skipped=True), RoundStat(3, 0, 2, {"drafter": [2, 0]})]
    m = acceptance_metrics(rounds)
    src = m["sources"]
    assert src["drafter"] == {"verified": 4, "accepted": 1, "acceptance": 0.25, "share_of_accepted": 0.2}
    assert src["copy"] == {"verified": 5, "accepted": 3, "acceptance": 0.6, "share_of_accepted": 0.6}
    assert src["both"]["acceptance"] == 1.0 and m["drafter_skipped_rounds"] == pytest.approx(1 / 3)
    assert "sources" not in acceptance_metrics([RoundStat(5, 4, 4)])


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


# --------------------------------------------------------------------------- benchmark files
def test_benchmark_by_name_and_path(tmp_path):
    b = load_benchmark("mt-bench", "../shared/data", n=3)
    assert b.name == "mt-bench" and len(b.prompts) == 3 and len(b.prompts[0]) == 2
    f = tmp_path / "mine.jsonl"
    f.write_text('{"turns": ["a"]}\n\n{"turns": ["b", "c"]}\n')
    b = load_benchmark(str(f), "unused")
    assert b.name == "mine" and b.prompts == [["a"], ["b", "c"]]


def test_bad_benchmark_path_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-bench.*no-such-bench.jsonl"):
        load_benchmark("no-such-bench", tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "x.jsonl")):
        load_benchmark(str(tmp_path / "x.jsonl"), "unused")


@pytest.mark.parametrize("bad, why", [('{"turns": ["ok"', "invalid JSON"), ('{"prompt": "x"}', "turns"),
                                      ('{"turns": []}', "turns"), ('["x"]', "turns")])
def test_malformed_line_names_file_and_line(tmp_path, bad, why):
    f = tmp_path / "b.jsonl"
    f.write_text('{"turns": ["one"]}\n{"turns": ["two"]}\n' + bad + "\n")
    with pytest.raises(BenchmarkError, match=rf"{f}: line 3: .*{why}"):
        load_benchmark(str(f), "unused", n=1)  # validated past the first N


def test_cli_reports_bad_benchmark_in_one_line(tmp_path, capsys):
    f = tmp_path / "b.jsonl"
    f.write_text("not json\n")
    assert cli_main(["eval", str(tmp_path), "--benchmarks", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"{f}: line 1" in err and "\n" not in err
    assert cli_main(["eval", str(tmp_path), "--benchmarks", "gsm8k,nope"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [(["--n", "-3"], "--n: must be >= 0"),
                                        (["--max-new-tokens", "-5"], "--max-new-tokens: must be >= 1"),
                                        (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
                                        (["--temperature", "-1"], "--temperature: must be >= 0"),
                                        (["--top-p", "0"], "--top-p: must be in"), (["--top-p", "1.5"], "--top-p"),
                                        (["--top-k", "-1"], "--top-k: must be >= 0"),
                                        (["--mode", "beam"], "--mode: expected one of chain, tree, adaptive"),
                                        (["--dtype", "int8"], "--dtype: expected one of"),
                                        (["--baselines", "medusa"], "--baselines: unknown"),
                                        (["--prompt-lookup-tokens", "0"], "--prompt-lookup-tokens: must be >= 1"),
                                        (["--threads", "0"], "--threads: must be >= 1"),
                                        (["--benchmarks", ","], "--benchmarks: must not be empty")])
def test_bad_eval_settings_exit_2_naming_the_flag(argv, flag, tmp_path, capsys):
    """Checked before anything loads: one line naming the flag, exit 2, no traceback ([M] cases 1 and 2)."""
    with pytest.raises(RecipeError, match=flag):
        eval_args(*argv)
    assert cli_main(["eval", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + flag.split(":")[0]) and "\n" not in err


def test_eval_config_defaults_are_the_flags_defaults():
    assert eval_args() == EvalConfig("artifact", progress=False)
    assert eval_args("--hybrid").hybrid and eval_args("--mode", "hybrid").hybrid and not eval_args().hybrid
    with pytest.raises(RecipeError, match="--n: expected an int, got '5'"):
        EvalConfig("artifact", n="5")


# --------------------------------------------------------------------------- the harness with scripted decoders
def scripted(plain, trace, corrupt_at=None):
    """A 'decoder' that returns plain decoding's ids (optionally one token changed) and a fixed trace, and no
    record of its pass (nothing the lossless check could compare)."""
    def run(prompt, max_new_tokens):
        ids, _, _ = plain(prompt, max_new_tokens)
        if corrupt_at is not None and corrupt_at < len(ids):
            ids[corrupt_at] = (ids[corrupt_at] + 1) % 256 + 4
        return ids, list(trace), None
    return run


def test_report_schema_and_speedup_from_scripted_decoders(tiny_target, tmp_path):
    args = eval_args("--max-new-tokens", "6", "--multi-turn")
    plain = hf_method(tiny_target.model, generation_kwargs(tiny_target, args.temperature, args.top_p, args.top_k))
    trace = [RoundStat(5, 4, 4), RoundStat(5, 0, 4)]
    methods = {PLAIN: plain, "good": scripted(plain, trace), "bad": scripted(plain, trace, corrupt_at=2),
               "prompt-lookup": hf_method(tiny_target.model,
                                          generation_kwargs(tiny_target, args.temperature, args.top_p, args.top_k),
                                          prompt_lookup_num_tokens=3)}
    bench = Benchmark("toy", tmp_path / "toy.jsonl", [["hi", "more"], ["hello"]])
    m = measure(bench, tiny_target, methods, args, ["good", "bad"])
    drafters = {"good": {"drafter": "good-artifact", "calibration": None},
                "bad": {"drafter": "bad", "calibration": None}}
    report = build_report([m], tiny_target, drafters, ["prompt-lookup"], args)
    write_report(report, tmp_path / "out", calibration=None)

    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(TOP_LEVEL) <= set(saved)
    assert saved["drafter"] == "good-artifact" and saved["mode"] == "chain" and saved["temperature"] == 0.0
    assert saved["dtype"] == "float32" and saved["device"] == "cpu"
    assert saved["machine"]["name"] == saved["device_name"] == cpu_info()[0]  # the CPU model, not platform.machine()
    assert saved["dtype_choice"] == {"setting": "float32", "value": "float32", "reason": "asked for"}
    e = saved["benchmarks"]["toy"]
    assert set(PER_BENCHMARK) <= set(e)
    # no plain decoding in another dtype was measured: the fastest plain is the same-precision one
    assert e["fastest_plain"] == {"dtype": "float32", "tokens_per_s": e["baseline_tokens_per_s"]}
    assert e["speedup_vs_fastest_plain"] == e["speedup"]
    assert e["n_prompts"] == 2 and e["n_generations"] == 3
    assert e["speedup"] == e["tokens_per_s"] / e["baseline_tokens_per_s"]
    assert e["tau"] == pytest.approx(3.0) and e["accept_rate_by_position"] == [0.5] * 4
    assert e["verify_rate"] == pytest.approx(6 / 10)
    assert e["lossless"] is True and e["agreement"] == 1.0 and e["divergences"] == []
    pl = e["baselines"]["prompt-lookup"]
    assert pl["speedup"] == pl["tokens_per_s"] / e["baseline_tokens_per_s"]
    assert pl["lossless"] is True  # fp32 greedy on the tiny target

    bad = saved["drafters"]["bad"]["benchmarks"]["toy"]
    assert bad["lossless"] is False and bad["agreement"] == 0.0
    assert [d["position"] for d in bad["divergences"]] == [2, 2, 2]
    # no record of its pass: nothing shows a divergence is rounding
    assert all(d["kind"] == "error" and "no record" in d["mismatch"] for d in bad["divergences"])
    assert bad["lossless_evidence"]["errors"] == 3 and len(bad["lossless_evidence"]["mismatches"]) == 3
    d = bad["divergences"][0]
    context = m.prompts[0][0] + m.samples[PLAIN][0][0].ids[:2]
    assert d["plain_token"] == tiny_target.model(torch.tensor([context])).logits[0, -1].argmax().item()

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| toy | 2 | 3.00 |" in md and "## bad" in md and "Comparison" in md
    assert_tables_well_formed(md)
    for png in ("acceptance_by_position.png", "speedup.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out" / "reliability.png").exists()  # no calibration data


def test_sampling_reports_lossless_null(tiny_target, tmp_path):
    args = eval_args("--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "20")
    plain = hf_method(tiny_target.model, generation_kwargs(tiny_target, args.temperature, args.top_p, args.top_k))
    methods = {PLAIN: plain, "d": scripted(plain, [RoundStat(3, 1, 2)])}
    m = measure(Benchmark("toy", tmp_path, [["hi"]]), tiny_target, methods, args, ["d"])
    report = build_report([m], tiny_target, {"d": {"drafter": "d"}}, [], args)
    e = report["benchmarks"]["toy"]
    assert e["lossless"] is None and e["divergences"] is None and e["baselines"] == {}
    write_report(report, tmp_path / "out", calibration=None)
    assert_tables_well_formed((tmp_path / "out" / "report.md").read_text())  # no baseline columns, none dangling


def assert_tables_well_formed(md: str) -> None:
    """Every markdown table's header has as many cells as its separator row and its body rows."""
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            width = line.count("|")
            rows = [lines[i - 1]] + [r for r in lines[i + 1:] if r.startswith("|")][:1]
            assert all(r.count("|") == width for r in rows), (lines[i - 1], line)


# --------------------------------------------------------------------------- end to end on the tiny target
@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory, tiny_recipe, tiny_target):
    """An untrained drafter exported like an artifact: config.json, model.safetensors, recipe.yaml, and a
    calibration.json with reliability bins (neutral temperatures, so chain drafting is unchanged)."""
    from dspark_train.policy.calibration import Calibration
    from dspark_train.config import recipe_to_yaml
    from dspark_train.drafters import build_drafter

    art = tmp_path_factory.mktemp("artifacts") / "dspark"
    torch.manual_seed(0)
    drafter = build_drafter(tiny_recipe.drafter, tiny_target)
    drafter.save_pretrained(art)
    (art / "recipe.yaml").write_text(recipe_to_yaml(tiny_recipe))
    g = drafter.config.block_size
    bins = [[0.25, 0.2, 3], [None, None, 0], [0.75, 0.8, 5]]
    Calibration(block_size=g, temperatures=[1.0] * g, ece_before=[0.1] * g, ece_after=[0.02] * g,
                auroc_before=[0.8] * g, auroc_after=[0.85] * g, brier_before=[0.2] * g, brier_after=[0.1] * g,
                adaptive={"max_width": 1, "beam": 1, "node_budget": g, "depth_threshold": 0.0, "width_threshold": None},
                reliability={s: {str(k + 1): bins for k in range(g)} for s in ("before", "after")}
                ).save(art / "calibration.json")
    return art


def test_end_to_end_tiny_target_is_lossless(tiny_artifact, tmp_path):
    out = tmp_path / "report"
    rc = cli_main(["eval", str(tiny_artifact), "--benchmarks", "gsm8k,mt-bench", "--n", "2", "--max-new-tokens", "8",
                   "--dtype", "float32", "--multi-turn", "--save-outputs", "--compare", str(tiny_artifact),
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert set(TOP_LEVEL) <= set(report)
    assert report["target"] == "inline:llama-seed0" and report["dtype"] == "float32" and report["mode"] == "chain"
    assert report["drafter"] == str(tiny_artifact) and len(report["drafters"]) == 2
    assert report["dtype_choice"]["setting"] == "float32" and report["machine"]["device"] == "cpu"
    for d in report["drafters"].values():
        assert d["kind"] == "dspark" and d["block_size"] == 4 and d["calibration"]["ece_after"] == [0.02] * 4
        for name, e in d["benchmarks"].items():
            assert set(PER_BENCHMARK) <= set(e), name
            assert e["lossless"] is True and e["agreement"] == 1.0 and e["divergences"] == []
            assert e["speedup"] == e["tokens_per_s"] / e["baseline_tokens_per_s"]
            # plain decoding was timed in both precisions; the second speedup is against the faster one
            by_dtype = e["plain_tokens_per_s_by_dtype"]
            assert set(by_dtype) == {"float32", "bfloat16"} and by_dtype["float32"] == e["baseline_tokens_per_s"]
            assert e["fastest_plain"]["tokens_per_s"] == max(by_dtype.values())
            assert by_dtype[e["fastest_plain"]["dtype"]] == e["fastest_plain"]["tokens_per_s"]
            assert e["speedup_vs_fastest_plain"] == e["tokens_per_s"] / e["fastest_plain"]["tokens_per_s"]
            assert e["baselines"]["prompt-lookup"]["speedup_vs_fastest_plain"] == pytest.approx(
                e["baselines"]["prompt-lookup"]["tokens_per_s"] / e["fastest_plain"]["tokens_per_s"])
            assert e["tau"] >= 1.0 and len(e["accept_rate_by_position"]) == 4
            assert 0 < e["verify_rate"] <= 1
            assert set(e["baselines"]) == {"prompt-lookup"}
    assert report["benchmarks"]["mt-bench"]["n_generations"] == 4  # two prompts, two turns each
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 4 and set(rows[0]["outputs"]) == {"plain", plain_name("bfloat16"), "dspark",
                                                              *report["drafters"], "prompt-lookup"}
    assert all(r["outputs"]["plain"]["ids"] == r["outputs"]["dspark"]["ids"] for r in rows)
    md = (out / "report.md").read_text()
    assert "| gsm8k | 2 |" in md and "× fastest plain" in md and f"machine cpu: {cpu_info()[0]}" in md
    for png in ("acceptance_by_position.png", "speedup.png", "reliability.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_adaptive_mode_needs_calibration(tiny_artifact, tmp_path, capsys):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(tiny_artifact, bare, ignore=shutil.ignore_patterns("calibration.json"))
    assert cli_main(["eval", str(bare), "--benchmarks", "mbpp", "--n", "1", "--mode", "adaptive"]) == 2
    assert "calibration.json" in capsys.readouterr().err


def test_end_to_end_hybrid_reports_sources_next_to_drafter_only(tiny_artifact, tmp_path, monkeypatch):
    """--mode hybrid measures the hybrid decoder with the same drafter without copy branches and
    copy drafting alone in the same run; all lossless, with per-source acceptance in report.json and .md."""
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))  # the measured SPS(B) of the tiny target
    out = tmp_path / "report"
    rc = cli_main(["eval", str(tiny_artifact), "--benchmarks", "humaneval,mbpp", "--n", "2", "--max-new-tokens", "12",
                   "--dtype", "float32", "--mode", "hybrid", "--baselines", "prompt-lookup,drafter-only,copy-only",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "hybrid" and report["hybrid"] is True
    for e in report["benchmarks"].values():
        assert e["lossless"] is True and set(e["baselines"]) == {"prompt-lookup", "drafter-only", "copy-only"}
        assert set(e["sources"]) == {"drafter", "copy", "both"} and 0 <= e["drafter_skipped_rounds"] <= 1
        assert sum(x["accepted"] for x in e["sources"].values()) == round((e["tau"] - 1) * e["rounds"])
        only = e["baselines"]["drafter-only"]
        assert only["lossless"] is True and only["tau"] >= 1 and only["sources"] is None
        assert e["baselines"]["copy-only"]["lossless"] is True
        assert e["baselines"]["copy-only"]["sources"]["drafter"]["verified"] == 0
    md = (out / "report.md").read_text()
    assert "Accepted draft tokens by source" in md and "drafter-only tok/s" in md


# --------------------------------------------------------------------------- the lossless verdict rests on evidence
def stale_slot(cache, ctx_len, slots):
    """A cache bookkeeping bug: the last accepted node's slot is swapped for the next verified one (a rejected
    draft's keys and values stay where the committed token's belong)."""
    from dspark_train.decoding.cache import keep_slots

    if slots[-1] + 1 < cache.layers[0].keys.shape[2] - ctx_len:
        slots = slots[:-1] + [slots[-1] + 1]
    keep_slots(cache, ctx_len, slots)


def eval_report(artifact, out, *argv):
    """`dspark eval` on two prompts of two benchmarks: its exit code (1: LosslessError) and report.json."""
    try:
        rc = cli_main(["eval", str(artifact), "--benchmarks", "gsm8k,mt-bench", "--n", "2", "--max-new-tokens", "12",
                       "--baselines", "", "--no-fastest-plain", "--out", str(out), "--no-progress", *argv])
    except SystemExit as e:
        rc = e.code
    return rc, json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cache_bookkeeping_bug_makes_the_lossless_column_say_no(tiny_artifact, tmp_path, monkeypatch, dtype):
    """The independent check of [S2] item 2: a mutation of the decoder's cache bookkeeping must turn `dspark
    eval`'s lossless column to NO in bf16 as in fp32, and `dspark eval` exits 1 naming it. On this tiny target
    the stale slot changes no output token: only the bit-level cache comparison sees it (layers 0-1 in bf16,
    layer 0 in fp32), where a margin argument would have nothing to look at."""
    from dspark_train.decoding import decoder as decoder_module

    monkeypatch.setattr(decoder_module, "keep_slots", stale_slot)
    rc, report = eval_report(tiny_artifact, tmp_path / "r", "--dtype", dtype, "--exact-attention", "off")
    assert rc == 1
    for e in report["benchmarks"].values():
        assert e["lossless"] is False and e["lossless_evidence"]["errors"] > 0
    assert "**NO**" in (tmp_path / "r" / "report.md").read_text()
    assert all("cache slot" in m for e in report["benchmarks"].values() for m in e["lossless_evidence"]["mismatches"])


@pytest.mark.parametrize("exact", ["off", "on"])
def test_bf16_lossless_rests_on_bit_exact_evidence(tiny_artifact, tmp_path, exact):
    """bf16 on a CPU: `lossless: yes` means the decoder's KV cache equals plain decoding's bit for bit (layers
    0-1 with the first layer row-exact; every layer and every chosen logits row with exact attention on) and any
    divergent output, replayed with every layer row-exact, is plain decoding's; the report says which."""
    rc, report = eval_report(tiny_artifact, tmp_path / "r", "--dtype", "bfloat16", "--exact-attention", exact)
    assert rc == 0
    ex = report["exact_attention"]
    assert ex["setting"] == exact and ex["row_exact_here"] is True and ex["of"] == 6
    assert ex["layers"] == (6 if exact == "on" else 1) and ex["measured"]["exact_ms"] > 0
    for e in report["benchmarks"].values():
        ev = e["lossless_evidence"]
        assert e["lossless"] is True and ev["errors"] == 0 and ev["tokens_compared"] > 0
        assert ev["cache_layers_compared"] == (6 if exact == "on" else 2) and ev["generations_checked"] == 2
        assert all(d["kind"] == "rounding" and d["replay"]["mismatch"] is None for d in e["divergences"])
        assert ev["replays"] == len(e["divergences"]) and (exact == "off" or not e["divergences"])
    assert "Lossless evidence:" in (tmp_path / "r" / "report.md").read_text()


def test_plain_decoding_runs_under_the_decoders_rules(tiny_recipe, tmp_path):
    """A target whose generation_config sets repetition_penalty (honoured by both sides: the decoder applies it
    exactly) and no_repeat_ngram_size (the decoder cannot reproduce it: plain decoding runs without it too);
    the report says which, and greedy output is plain decoding's."""
    from dspark_train.drafters import build_drafter
    from dspark_train.target import load_target

    fresh = load_target(tiny_recipe.target)
    src = tmp_path / "target"
    fresh.model.generation_config.repetition_penalty = 1.3
    fresh.model.generation_config.no_repeat_ngram_size = 2
    fresh.model.save_pretrained(src)
    fresh.tokenizer.save_pretrained(src)
    target = load_target(TargetConfig(model=str(src), dtype="float32"))
    assert target.model.generation_config.repetition_penalty == 1.3
    torch.manual_seed(0)
    art = tmp_path / "art"
    build_drafter(tiny_recipe.drafter, target).save_pretrained(art)
    rc, report = eval_report(art, tmp_path / "r", "--target", str(src), "--dtype", "float32")
    assert rc == 0
    assert report["generation_rules"] == {"honoured": {"repetition_penalty": 1.3},
                                          "disabled": {"no_repeat_ngram_size": 2}}
    for e in report["benchmarks"].values():
        assert e["lossless"] is True and e["agreement"] == 1.0
    assert "repetition_penalty" in (tmp_path / "r" / "report.md").read_text()


def test_concurrency_eval_end_to_end(tiny_artifact, tmp_path, monkeypatch):
    """[T] 1: `dspark eval --concurrency 1,2,4` decodes the same requests R at a time, speculative (load-aware
    scheduler, batched drafting) next to our batched plain decoding and transformers' batched generate; per R
    tokens/s of each, speedup against the faster plain, latency, τ, verified tokens per request per round, the
    drafter's share; every request's greedy output identical to its one-at-a-time plain decode (fp32)."""
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))  # SPS(B) of the tiny target, 1, 2 and 4 rows
    out = tmp_path / "conc"
    rc = cli_main(["eval", str(tiny_artifact), "--benchmarks", "gsm8k", "--n", "3", "--max-new-tokens", "10",
                   "--dtype", "float32", "--concurrency", "1,2,4", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "concurrency.json").read_text())
    assert report["concurrency"] == [1, 2, 4] and report["batched_drafting"] is True and report["dtype"] == "float32"
    assert set(report["sps"]) == {"1", "2", "4"} and report["sps"]["4"]["tokens"] == [4, 8, 12, 16, 20]
    b = report["benchmarks"]["gsm8k"]
    assert b["requests"] == 4  # 3 prompts cycled to the largest R
    for r, e in b["by_concurrency"].items():
        s = e["speculative"]
        assert s["lossless"] is True and s["agreement"] == 1.0 and s["divergences"] == [], r
        assert e["plain"]["agreement"] == 1.0 and e["plain-hf"]["agreement"] == 1.0
        fastest = max(e["plain"]["tokens_per_s"], e["plain-hf"]["tokens_per_s"])
        assert e["speedup"] == pytest.approx(s["tokens_per_s"] / fastest)
        assert s["tokens"] == e["plain"]["tokens"] == e["plain-hf"]["tokens"]  # the same requests, to their stops
        assert 0 < s["latency_mean_s"] <= s["latency_p90_s"] + 1e-9 and s["tau"] >= 1.0
        assert s["computed_per_request_round"] >= s["verified_per_request_round"] >= 1.0
        assert 0 <= s["drafter_share"] < 1 and s["drafted_rounds"] >= 1
    md = (out / "concurrency.md").read_text()
    assert "| 4 |" in md and "plain tok/s (ours / hf)" in md
    assert_tables_well_formed(md)
    assert (out / "speedup_vs_concurrency.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RecipeError, match=r"--concurrency: must all be >= 1, got \[0, 4\]"):
        eval_args("--concurrency", "0,4")


def test_the_tuners_expectation_is_reported_next_to_the_measurement():
    """[T] 5: per dev set, the tuner's expected tokens/s (held-out rounds) and speedup next to the measured ones
    (decode-only, from each round's measured time), and the cost model applied to the dev set's own rounds."""
    from dspark_train.evaluation.expectation import compare, tuner_record
    from dspark_train.evaluation.report import _tuner_table

    cal = {"adaptive": {"node_budget": 4}, "expected": {"adaptive": {"tau": 1.8, "verified": 5.0, "tokens_per_s": 20.0},
                                                        "plain": {"tau": 1.0, "verified": 1.0, "tokens_per_s": 14.0}},
           "data": {"tuning": {"round_cost": {"base": 0.01, "per_node": 0.001, "plain": 0.002}}},
           "cost_profile": {"tokens": [1, 8], "steps_per_s": [10.0, 8.0]}}
    assert tuner_record({"source": "re-tuned on this machine"}, cal) is None  # no expectation recorded with it
    record = tuner_record({"source": "calibration.json", "policy": cal["adaptive"]}, cal)
    rounds = [RoundStat(5, 2, 4, seconds=0.2), RoundStat(5, 0, 4, seconds=0.1)]  # 4 tokens in 0.3 s
    t = compare(record, rounds, measured_speedup=1.25)
    assert t["measured_decode_tokens_per_s"] == pytest.approx(4 / 0.3) and t["measured_tau"] == 2.0
    assert t["expected_over_measured"] == pytest.approx(20.0 / (4 / 0.3)) and t["expected_speedup"] == 20 / 14
    sps5 = 1 / (0.1 + (5 - 1) / 7 * (1 / 8.0 - 0.1))  # SPS(5): step time interpolated between B = 1 and 8
    assert t["cost_model_tokens_per_s"] == pytest.approx(4 / (2 * (0.01 + 0.001 * 4 + 1 / sps5)))
    lines = "\n".join(_tuner_table({"gsm8k": {"tuner": t}}))
    assert "held-out τ 1.80" in lines and "| gsm8k | 20.0 | 13.3 (2.00) | 1.50 |" in lines
    assert "1.43× | 1.25× |" in lines
