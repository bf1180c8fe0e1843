"""Recipe loading: typed, validated, overridable; errors name the file and the dotted key."""
import subprocess
import sys

import pytest

from dspark_train.config import RecipeError, load_recipe


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "target:\n  config: {hidden_size: 32}\n"


@pytest.mark.parametrize("body, message", [
    ("train:\n  lr: fast\n", "train.lr: expected a float, got 'fast'"),
    ("train:\n  lrr: 0.1\n", "train.lrr: unknown key"),
    ("trian:\n  lr: 0.1\n", "trian: unknown key"),
    ("drafter:\n  head: lstm\n", "drafter.head: expected one of ['markov', 'rnn', 'none'], got 'lstm'"),
    ("drafter:\n  block_size: 1\n", "drafter.block_size: must be >= 2"),
    ("train:\n  max_steps: 2.5\n", "train.max_steps: expected an int, got 2.5"),
    ("train:\n  warmup_ratio: 1.5\n", "train.warmup_ratio: must be in [0, 1)"),
    ("logging:\n  trackers: [mlflow]\n", "logging.trackers: unknown tracker 'mlflow'"),
    ("distributed:\n  accelerate_config: nope.yaml\n", "distributed.accelerate_config: file not found: nope.yaml"),
    ("train: [1, 2]\n", "train: expected a mapping"),
    ("data:\n  heldout: true\n", "data.heldout: expected an int, got True"),
])
def test_bad_values_name_file_and_key(tmp_path, body, message):
    p = write(tmp_path, BASE + body)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_target_and_file(tmp_path):
    with pytest.raises(RecipeError, match="target.model"):
        load_recipe(write(tmp_path, "train: {lr: 0.1}\n"))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(write(tmp_path, "train: [\n"))


def test_overrides_types_and_nesting(repo):
    r = load_recipe(repo / "recipes" / "tiny.yaml",
                    ["train.lr=3e-4", "train.max_steps=7", "drafter.head=rnn", "logging.trackers=[wandb]",
                     "target.feature_layers=[1,3]"])
    assert r.train.lr == 3e-4 and r.train.max_steps == 7 and r.drafter.head == "rnn"
    assert r.logging.trackers == ["wandb"] and r.target.feature_layers == [1, 3]
    with pytest.raises(RecipeError, match="train.max_steps: expected an int"):
        load_recipe(repo / "recipes" / "tiny.yaml", ["train.max_steps=many"])
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(repo / "recipes" / "tiny.yaml", ["train.lr"])


def test_int_accepted_for_float(tmp_path):
    assert load_recipe(write(tmp_path, BASE + "train:\n  lr: 1\n")).train.lr == 1.0


def test_data_paths_resolve_against_root(repo, tmp_path):
    r = load_recipe(repo / "recipes" / "tiny.yaml", [f"data.root={tmp_path}"])
    assert r.resolve_data_path("eval/gsm8k.jsonl") == tmp_path / "eval" / "gsm8k.jsonl"
    assert r.resolve_data_path("/abs/x.jsonl").as_posix() == "/abs/x.jsonl"


def test_cli_exit_code_2_one_line_no_traceback(tmp_path):
    p = write(tmp_path, BASE + "train:\n  lr: fast\n")
    proc = subprocess.run([sys.executable, "-m", "dspark_train.cli", "plan", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {p}: train.lr: expected a float, got 'fast'"
    assert "Traceback" not in proc.stderr


def test_bare_no_is_a_string_choice(repo):
    r = load_recipe(repo / "recipes" / "tiny.yaml", ["train.mixed_precision=no"])
    assert r.train.mixed_precision == "no"


def test_relative_paths_read_beside_the_recipe_and_write_under_the_current_directory(tmp_path, monkeypatch):
    """[O3] What a recipe reads (data.root, target.config_path, distributed.accelerate_config) resolves against its
    folder, what a run writes against the current directory, a --set value against the current directory; a copy
    made elsewhere still finds the shipped accelerate config; the run's recorded recipe reads the same files."""
    from dspark_train import shipped
    from dspark_train.config import recipe_to_yaml

    proj, here = tmp_path / "proj", tmp_path / "elsewhere"
    (proj / "data").mkdir(parents=True)
    here.mkdir()
    (proj / "arch.json").write_text("{}")
    (here / "arch2.json").write_text("{}")
    recipe = proj / "my.yaml"
    recipe.write_text("target:\n  config: {hidden_size: 32}\n  config_path: arch.json\ndata:\n  root: data\n"
                      "train:\n  output_dir: runs/mine\ndistributed:\n  accelerate_config: accelerate/zero2.yaml\n")
    monkeypatch.chdir(here)
    r = load_recipe(recipe)
    assert r.data.root == str((proj / "data").resolve())
    assert r.resolve_data_path("x.jsonl") == (proj / "data").resolve() / "x.jsonl"
    assert r.target.config_path == str((proj / "arch.json").resolve())
    assert r.distributed.accelerate_config == str((shipped.accelerate_dir() / "zero2.yaml").resolve())
    assert r.resolve_path(r.train.output_dir) == here / "runs" / "mine"

    r2 = load_recipe(recipe, ["data.root=mine", "target.config_path=arch2.json"])
    assert r2.data.root == str((here / "mine").resolve())
    assert r2.target.config_path == str((here / "arch2.json").resolve())

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(recipe_to_yaml(r))
    assert "accelerate_config: accelerate/zero2.yaml\n" in recipe_to_yaml(r)  # shipped: found on any machine
    again = load_recipe(tmp_path / "run" / "recipe.yaml")
    for key in ("data.root", "target.config_path", "distributed.accelerate_config"):
        section, name = key.split(".")
        assert getattr(getattr(again, section), name) == getattr(getattr(r, section), name), key

    recipe.write_text(recipe.read_text().replace("arch.json", "nope.json"))
    with pytest.raises(RecipeError, match=f"target.config_path: file not found: nope.json \\(looked in {proj}, "):
        load_recipe(recipe)


def test_a_recipe_argument_is_a_file_or_the_name_of_a_shipped_recipe(tmp_path, monkeypatch, repo):
    from dspark_train import shipped

    monkeypatch.chdir(tmp_path)
    by_name = load_recipe("tiny")
    assert by_name.source == str(shipped.folder() / "tiny.yaml") and load_recipe("tiny.yaml").source == by_name.source
    # in a checkout the shipped recipes are its recipes/: data from ../shared/data beside it, as before
    assert shipped.folder().resolve() == (repo / "recipes").resolve()
    assert by_name.data.root == str((repo / ".." / "shared" / "data").resolve())
    (tmp_path / "tiny.yaml").write_text(BASE)  # an existing file comes first
    assert load_recipe("tiny.yaml").source == "tiny.yaml"
    with pytest.raises(RecipeError, match=r"^nope: recipe file not found, and no shipped recipe of that name "
                                          r"\(shipped: .*smollm2_135m, .*tiny\)$"):
        load_recipe("nope")
