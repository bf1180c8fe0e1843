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
    from dspark_train.export import export_run

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
    from dspark_train.data import read_jsonl
    from dspark_train.regenerate import run_data

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
    from dspark_train.data import conversations_path, load_conversations

    conv = tmp_path / "conv.jsonl"
    _conversations(conv, bad_line=3)
    recipe = load_recipe(repo / "recipes" / "tiny.yaml", [f"data.conversations={conv}", "data.skip_bad_lines=true"])
    convs = load_conversations(conversations_path(recipe), skip_bad_lines=recipe.data.skip_bad_lines)
    assert [c["id"] for c in convs] == [f"c{i}" for i in range(12) if i != 2]
    assert f"{conv}: skipped 1 bad line (line 3: invalid UTF-8" in capsys.readouterr().err


# --------------------------------------------------------------------------- case 7: JSONL split on \n only
SEPARATORS = "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg"  # str.splitlines() breaks at each of these


def test_case_7_jsonl_strings_may_hold_unicode_line_separators(tmp_path, repo):
    from dspark_train.config import load_recipe
    from dspark_train.data import load_conversations, load_prompts, prompt_turns
    from dspark_train.evaluate import load_benchmark

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
    from dspark_train.export import _is_hub_id

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
