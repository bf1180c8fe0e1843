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
    ("drafter:\n  head: lstm\n", "drafter.head: expected one of markov, rnn, none, got 'lstm'"),
    ("drafter:\n  block_size: 1\n", "drafter.block_size: must be >= 2"),
    ("train:\n  max_steps: 2.5\n", "train.max_steps: expected an int, got 2.5"),
    ("train:\n  warmup_ratio: 1.5\n", "train.warmup_ratio: must be in [0, 1)"),
    ("logging:\n  trackers: [mlflow]\n", "logging.trackers: unknown 'mlflow' (known: wandb, tensorboard)"),
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


def test_a_settings_rules_live_on_its_field():
    """[O3] `setting` carries bounds, choices and non-emptiness; `check_settings` walks every field, a nested section
    too, refuses NaN/infinity anywhere and names the key the caller's way (recipe key or flag)."""
    from dataclasses import dataclass, field
    from typing import Optional

    from dspark_train.config import check_settings, setting

    @dataclass
    class Inner:
        rate: float = setting(0.5, ge=0, le=1)

    @dataclass
    class Outer:
        count: Optional[int] = setting(None, ge=1)
        kind: str = setting("a", choices=("a", "b"))
        sizes: list[int] = setting([1], gt=0, nonempty=True)
        names: list[str] = setting([], choices=("x", "y"))
        inner: Inner = field(default_factory=Inner)

    def error(**kw) -> str:
        o = Outer(**{k: v for k, v in kw.items() if k != "rate"})
        o.inner.rate = kw.get("rate", 0.5)
        with pytest.raises(RecipeError) as e:
            check_settings(o, lambda key: f"f.yaml: s.{key}")
        return str(e.value)

    check_settings(Outer(), lambda key: key)  # defaults pass, None is "not set"
    assert Outer().sizes is not Outer().sizes  # a list default is copied
    assert error(count=0) == "f.yaml: s.count: must be >= 1, got 0"
    assert error(kind="c") == "f.yaml: s.kind: expected one of a, b, got 'c'"
    assert error(sizes=[]) == "f.yaml: s.sizes: must not be empty, got []"
    assert error(sizes=[2, 0]) == "f.yaml: s.sizes: must all be > 0, got [2, 0]"
    assert error(names=["x", "z"]) == "f.yaml: s.names: unknown 'z' (known: x, y)"
    assert error(rate=1.5) == "f.yaml: s.inner.rate: must be in [0, 1], got 1.5"
    assert error(rate=float("nan")) == "f.yaml: s.inner.rate: must be a finite number, got nan"
    with pytest.raises(RecipeError, match=r"^--count: expected an int, got '5'$"):
        check_settings(Outer(count="5"), lambda key: f"--{key}", coerce=True)


def test_retired_export_keys_load_from_a_recorded_recipe_and_are_refused_where_set(tmp_path, repo, capsys):
    """[O3] export.output_dir and export.private were never read: every run's recorded recipe.yaml lists them with
    their defaults, and such a recipe still loads; a recipe that sets them gets one line naming the key and what to
    do instead (before: accepted, and the push was public all the same); a run's record that set one loads with a
    note saying it is ignored."""
    text = (repo / "recipes" / "tiny.yaml").read_text().replace("export: {}", "export:\n  output_dir: null\n"
                                                               "  repo_id: null\n  license: mit\n  private: false\n")
    old = write(tmp_path, text)
    assert load_recipe(old).export.license == "mit"
    old.write_text(text.replace("private: false", "private: true"))
    with pytest.raises(RecipeError, match=r"r.yaml: export.private: no longer a recipe key \(.*--private to `dspark "
                                          r"push`\)$"):
        load_recipe(old)
    capsys.readouterr()
    assert load_recipe(old, recorded=True).export.license == "mit"  # a run's record: history, read as it is
    assert capsys.readouterr().err == (f"note: {old}: export.private: True ignored, no longer a recipe key (it never "
                                       "reached the Hub; pass --private to `dspark push`)\n")
    with pytest.raises(RecipeError, match=r"export.output_dir: no longer a recipe key \(.*`dspark export RUN OUT_DIR`"):
        load_recipe(repo / "recipes" / "tiny.yaml", ["export.output_dir=somewhere"])


def test_the_feature_cache_keys_moved_to_the_data_stage(tmp_path, repo, capsys):
    """[O3] train.feature_cache(_dir) are data.feature_cache(_dir) now (`dspark data` captures into the cache, so
    the data stage owns them): a recipe or --set naming the old key is refused saying which key to set; a run's
    recorded recipe that set them loads with a note and the values under the new keys; the default (`off`, which
    every recorded recipe lists) loads silently."""
    text = (repo / "recipes" / "tiny.yaml").read_text().replace("train:\n", "train:\n  feature_cache: int8\n"
                                                               "  feature_cache_dir: /somewhere/features\n")
    old = write(tmp_path, text)
    with pytest.raises(RecipeError, match=r"r.yaml: train.feature_cache: no longer a recipe key \(the data stage's "
                                          r"now: set data.feature_cache\)$"):
        load_recipe(old)
    with pytest.raises(RecipeError, match=r"train.feature_cache_dir: no longer .*set data.feature_cache_dir\)$"):
        load_recipe(repo / "recipes" / "tiny.yaml", ["train.feature_cache_dir=/x"])
    with pytest.raises(RecipeError, match=r"train.feature_cache: no longer a recipe key"):  # asked for: refused
        load_recipe(old, ["train.feature_cache=bfloat16"], recorded=True)
    capsys.readouterr()
    r = load_recipe(old, recorded=True)
    assert (r.data.feature_cache, r.data.feature_cache_dir) == ("int8", "/somewhere/features")
    assert capsys.readouterr().err.splitlines() == [
        f"note: {old}: train.feature_cache: read as data.feature_cache = 'int8' (a recipe now sets that key)",
        f"note: {old}: train.feature_cache_dir: read as data.feature_cache_dir = '/somewhere/features' (a recipe now "
        "sets that key)"]
    assert load_recipe(write(tmp_path, text.replace("int8", "'off'").replace("/somewhere/features", "null"))
                       ).data.feature_cache == "off"
    assert capsys.readouterr().err == ""
    assert load_recipe(repo / "recipes" / "tiny.yaml", ["data.feature_cache=int8"]).data.feature_cache == "int8"


def _bounds(cls, prefix=""):
    """(dotted key, a value just past one of its bounds) for every bounded setting of a recipe section."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _bounds(tp, key + ".")
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X]: X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        is_list = typing.get_origin(tp) is list
        base = typing.get_args(tp)[0] if is_list else tp
        step = 1 if base is int else 0.5
        for bound, past in (("ge", -step), ("gt", 0), ("le", step), ("lt", 0)):
            if bound in f.metadata:
                bad = f.metadata[bound] + past
                yield key, bound, [bad] if is_list else bad


def test_every_bound_of_the_recipe_names_its_key(repo):
    """[O3] Each bounded recipe setting, set just past its bound with --set, is refused on one line naming the file
    and its dotted key (the bounds live on the fields: config.setting)."""
    import json
    import re

    from dspark_train.config import SECTIONS, Recipe

    checked = [(key, bound, bad) for key, bound, bad in _bounds(Recipe) if key.split(".")[0] in SECTIONS]
    assert len(checked) >= 40 and {b for _, b, _ in checked} == {"ge", "gt", "le", "lt"}
    for key, _, bad in checked:
        with pytest.raises(RecipeError, match=rf"tiny.yaml: {re.escape(key)}: must (all )?be "):
            load_recipe(repo / "recipes" / "tiny.yaml", [f"{key}={json.dumps(bad)}"])
