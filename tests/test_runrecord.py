"""A finished run read back one way (runrecord.py): its recipe, target and held-out split, from the run directory or
its artifact, also where the run was made on another machine (its own accelerate config and target config.json
absent, the run directory gone)."""
import json
import shutil

import pytest
import torch

from dspark_train.artifacts.export import export_run, export_speculators
from dspark_train.config import RecipeError, load_recipe, recipe_to_yaml
from dspark_train.evaluation.evaluate import target_config


@pytest.fixture()
def far_run(tmp_path, repo, tiny_target):
    """A run of the tiny recipe trained with the user's own accelerate config and target config.json (absolute in
    its recorded recipe), its held-out split, and its artifact."""
    from dspark_train.drafters import build_drafter

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "zero.yaml").write_text((repo / "recipes" / "accelerate" / "single_cpu.yaml").read_text())
    (mine / "arch.json").write_text(json.dumps(tiny_target.config.to_dict()))
    recipe = load_recipe(repo / "recipes" / "tiny.yaml", [f"distributed.accelerate_config={mine / 'zero.yaml'}",
                                                          f"target.config_path={mine / 'arch.json'}"])
    torch.manual_seed(0)
    drafter = build_drafter(recipe.drafter, tiny_target)
    run = tmp_path / "run"
    drafter.save_pretrained(run / "final")
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    conversations = recipe.resolve_data_path(recipe.data.conversations[0])
    (run / "heldout_ids.json").write_text(json.dumps({"format_version": 1, "conversations": [str(conversations)],
                                                      "seed": 0, "ids": ["a", "b"]}))
    artifact = export_run(run, tmp_path / "artifact")
    return recipe, run, artifact, mine


def test_an_artifact_copied_to_another_machine_is_read_by_every_reader(far_run, tmp_path, tiny_target, capsys):
    """Every reader of a finished run, on its artifact copied elsewhere with the run and the files its recipe named
    for training gone: eval's target, the speculators export (before: refused, `distributed.accelerate_config:
    file not found`) and the model card's Python example (the same refusal)."""
    recipe, run, artifact, mine = far_run
    copy = tmp_path / "elsewhere" / "artifact"
    shutil.copytree(artifact, copy)
    shutil.rmtree(run)
    shutil.rmtree(artifact)
    shutil.rmtree(mine)

    assert target_config(None, copy, None) == recipe.target.__class__(**{**recipe.target.__dict__,
                                                                        "config_path": None})
    out = export_speculators(copy, tmp_path / "spec", mask_token_id=3)  # the target built from the recipe
    assert (out / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    card = (copy / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    exec(code.replace("path/to/artifact", str(copy)).replace("max_new_tokens=256", "max_new_tokens=4"), {})
    assert capsys.readouterr().out.strip()


def test_one_reader_for_a_run_and_an_artifact(far_run, tmp_path):
    """read_run: the recorded recipe with absent training-only inputs null (present ones kept), the target, the
    held-out split of a run (none in an artifact); overrides apply; a directory without a recipe is named."""
    from dspark_train.runrecord import read_run

    recipe, run, artifact, mine = far_run
    record = read_run(run)
    assert record.recipe.distributed.accelerate_config == str(mine / "zero.yaml")  # here: kept
    assert record.target == recipe.target and record.recipe.data.root == recipe.data.root
    split = record.heldout()
    assert split.ids == ["a", "b"] and split.seed == 0
    assert split.conversations == [recipe.resolve_data_path(recipe.data.conversations[0])]
    assert read_run(artifact).heldout() is None and read_run(artifact).text == (run / "recipe.yaml").read_text()
    assert read_run(artifact, ["calibrate.prompts=3"]).recipe.calibrate.prompts == 3

    shutil.rmtree(mine)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    record = read_run(moved)
    assert record.recipe.distributed.accelerate_config is None and record.target.config_path is None
    assert record.heldout().ids == ["a", "b"]
    with pytest.raises(RecipeError, match="distributed.accelerate_config: file not found"):  # asked for: still checked
        read_run(moved, [f"distributed.accelerate_config={mine / 'zero.yaml'}"])
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no recipe.yaml"):
        read_run(tmp_path)
    (moved / "heldout_ids.json").write_text(json.dumps({"format_version": 2, "ids": []}))
    with pytest.raises(RecipeError, match="heldout_ids.json: format_version 2"):
        read_run(moved).heldout()
