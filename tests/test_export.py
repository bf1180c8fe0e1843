"""Artifact export/load round trip, fingerprint check, corrupted weights, model card, Hub push at the HfApi boundary."""
import json
import os
import re
import socket

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dspark_train.artifacts import reader as art
from dspark_train.drafters import loading
from dspark_train.drafters.config import FORMAT_VERSION
from dspark_train.layout import ArtifactError
from dspark_train.artifacts import export as ex
from dspark_train.config import recipe_to_yaml

REPORT = {
    "target": "inline:llama-seed0", "drafter": "artifact", "device": "cpu", "dtype": "float32", "temperature": 0.0,
    "mode": "chain",
    "machine": {"device": "cpu", "name": "AMD EPYC", "flags": ["avx2"], "threads": 2, "cuda_bf16": False},
    "benchmarks": {
        "gsm8k": {"n_prompts": 50, "tau": 3.4567, "accept_rate_by_position": [0.8, 0.6, 0.4, 0.2],
                  "conditional_accept_by_position": [0.8, 0.75, 0.66, 0.5], "verify_rate": 0.61,
                  "tokens_per_s": 41.5, "baseline_tokens_per_s": 20.0, "speedup": 2.075, "lossless": True,
                  "fastest_plain": {"dtype": "bfloat16", "tokens_per_s": 30.0}, "speedup_vs_fastest_plain": 41.5 / 30,
                  "baselines": {"prompt_lookup": {"tokens_per_s": 24.0}}},
        "mt-bench": {"n_prompts": 80, "tau": 2.25, "accept_rate_by_position": [0.6, 0.3, 0.1, 0.05],
                     "verify_rate": 0.4, "tokens_per_s": 30.0, "baseline_tokens_per_s": 20.0, "speedup": 1.5,
                     "lossless": True},
    },
}
CALIBRATION = {  # calibration.json as dspark calibrate writes it (calibrate.Calibration), small
    "block_size": 4, "temperatures": [1.25, 1.5, 1.75, 2.0], "ece_before": [0.06, 0.07, 0.08, 0.08],
    "ece_after": [0.01, 0.012, 0.011, 0.009], "auroc_before": [0.8, 0.8, 0.8, 0.8],
    "auroc_after": [0.85, 0.84, 0.86, 0.83], "brier_before": [0.2, 0.2, 0.2, 0.2], "brier_after": [0.1, 0.1, 0.1, 0.1],
    "adaptive": {"depth_threshold": 0.31, "width_threshold": 0.6, "max_width": 2, "node_budget": 16, "beam": 1},
    "expected": {"adaptive": {"tau": 3.1, "verified": 5.0, "tokens_per_s": 40.0}, "best_chain_depth": 3,
                 "best_chain": {"tau": 2.9, "verified": 4.0, "tokens_per_s": 37.0}},
    "measured": {}, "cost_profile": {"steps_per_s": [20.0 - 0.1 * i for i in range(32)],
                                     "meta": {"device": "cpu", "dtype": "float32"}},
    "reliability": {},
    "data": {"n_prompts": 8, "sts": {"source": "probe rounds", "blocks": 120}, "count": [120, 90, 60, 30],
             "dtype": "float32"},
    "format_version": 1,
}
AMD = "cpu: AMD EPYC has no amx_bf16/avx512_bf16"
SUMMARY = {"steps": 20, "tokens": 12345, "final": {"loss": 1.23, "l1": 0.5},
           "hardware": {"machine": "cpu: AMD EPYC (avx2; no amx_bf16/avx512_bf16), 2 threads",
                        "target_dtype": {"setting": "auto", "value": "float32", "reason": f"{AMD} → float32"},
                        "mixed_precision": {"setting": "auto", "value": "no", "reason": f"{AMD} → fp32 training"}}}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def drafter_and_target(tiny_recipe, tiny_target):
    from dspark_train.drafters import build_drafter
    torch.manual_seed(0)
    drafter = build_drafter(tiny_recipe.drafter, tiny_target)
    with torch.no_grad():  # move off the init so the round trip is not trivially "all defaults"
        for p in drafter.parameters():
            p.add_(0.02 * torch.randn_like(p))
    drafter.attach_target(tiny_target)
    return drafter.eval(), tiny_target


def make_run(root, recipe, drafter, calibration=True, report=True, summary=True):
    run = root / "run"
    drafter.save_pretrained(run / "final")
    (run / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    if calibration:
        (run / "calibration.json").write_text(json.dumps(CALIBRATION))
    if report:
        (run / "eval").mkdir()
        (run / "eval" / "report.json").write_text(json.dumps(REPORT))
    if summary:
        (run / "train_summary.json").write_text(json.dumps(SUMMARY))
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_recipe, drafter_and_target):
    root = tmp_path_factory.mktemp("export")
    run = make_run(root, tiny_recipe, drafter_and_target[0])
    return run, ex.export_run(run, root / "artifact")


def training_logits(drafter, target, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.vocab_size, (2, 24), generator=g)
    f = target.forward_features(ids)
    anchors = torch.tensor([[3, 9, 15], [5, 12, -1]])
    with torch.no_grad():
        out = drafter(f.features, f.last_hidden, ids, anchors)
    return out.logits, out.conf_logits


# --------------------------------------------------------------------------- export + load
def test_export_writes_artifact_and_round_trips(exported, drafter_and_target):
    run, out = exported
    drafter, target = drafter_and_target
    assert sorted(p.name for p in out.iterdir()) == sorted(art.ARTIFACT_FILES)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    config = json.loads((out / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["target_fingerprint"] == json.loads(json.dumps(target.fingerprint()))
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(drafter.state_dict())  # drafter weights only: no target embedding / LM head
    assert (out / "recipe.yaml").read_text() == (run / "recipe.yaml").read_text()
    assert json.loads((out / "calibration.json").read_text()) == CALIBRATION

    loaded = art.load_artifact(out, target=target)
    assert loaded.calibration == CALIBRATION
    for a, b in zip(training_logits(drafter, target), training_logits(loaded, target)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_load_training_run_directly(exported, drafter_and_target):
    run, _ = exported
    drafter, target = drafter_and_target
    loaded = art.load_artifact(run, target=target)
    assert loaded.calibration == CALIBRATION
    torch.testing.assert_close(training_logits(drafter, target, 1)[0], training_logits(loaded, target, 1)[0],
                               rtol=0, atol=0, equal_nan=True)


def test_export_refuses_existing_and_replaces_with_force(tmp_path, tiny_recipe, drafter_and_target):
    run = make_run(tmp_path, tiny_recipe, drafter_and_target[0], calibration=False, report=False, summary=False)
    out = tmp_path / "art"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ex.ArtifactError, match="already exists.*--force"):
        ex.export_run(run, out)
    assert (out / "stale.txt").exists()
    ex.export_run(run, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "recipe.yaml"]
    assert art.load_artifact(out).calibration is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "run"]
    with pytest.raises(ex.ArtifactError, match="training run itself"):
        ex.export_run(run, run, force=True)
    assert (run / "final" / "model.safetensors").is_file()


def test_interrupted_export_leaves_previous_state(tmp_path, tiny_recipe, drafter_and_target, monkeypatch):
    run = make_run(tmp_path, tiny_recipe, drafter_and_target[0])

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "render_model_card", boom)
    with pytest.raises(KeyboardInterrupt):
        ex.export_run(run, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no artifact, no temp dir
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("previous artifact")
    with pytest.raises(KeyboardInterrupt):
        ex.export_run(run, tmp_path / "old", force=True)
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "run"]
    monkeypatch.undo()
    real_rename = os.rename

    def rename(src, dst):  # interrupted after the previous artifact was moved aside, before the new one lands
        if ".tmp" in str(src):
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        ex.export_run(run, tmp_path / "old", force=True)
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "run"]


def test_export_missing_inputs_are_named(tmp_path, tiny_recipe, drafter_and_target):
    with pytest.raises(ex.ArtifactError, match="final/config.json"):
        ex.export_run(tmp_path, tmp_path / "a")
    run = make_run(tmp_path, tiny_recipe, drafter_and_target[0], calibration=False, report=False, summary=False)
    (run / "calibration.json").write_text(json.dumps({"temperatures": [1.0]}))
    with pytest.raises(ex.ArtifactError, match="calibration.json: not a calibration"):
        ex.export_run(run, tmp_path / "a")
    (run / "calibration.json").write_text("{not json")
    with pytest.raises(ex.ArtifactError, match="calibration.json"):
        ex.export_run(run, tmp_path / "a")
    (run / "recipe.yaml").unlink()
    with pytest.raises(ex.ArtifactError, match="recipe.yaml"):
        ex.export_run(run, tmp_path / "a")
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- fingerprint
def test_mismatched_target_refused(exported, tiny_recipe):
    from dspark_train.config import TargetConfig
    from dspark_train.target import load_target
    _, out = exported
    other_seed = load_target(TargetConfig(config=tiny_recipe.target.config, seed=1, dtype="float32"))
    with pytest.raises(loading.FingerprintMismatch, match=r"model_id: drafter trained for 'inline:llama-seed0', "
                                                       r"target has 'inline:llama-seed1'"):
        art.load_artifact(out, target=other_seed)
    wider = load_target(TargetConfig(config={**tiny_recipe.target.config, "hidden_size": 32}, dtype="float32"))
    with pytest.raises(loading.FingerprintMismatch, match="hidden_size: drafter trained for 64, target has 32"):
        art.load_artifact(out, target=wider)


def test_check_fingerprint_fields(exported, tiny_target):
    _, out = exported
    fp = tiny_target.fingerprint()
    loading.check_fingerprint(out, tiny_target)
    loading.check_fingerprint(out, {**fp, "revision": "abc123"})  # the drafter pinned no revision: not compared
    for key, value in [("tokenizer_hash", "0" * 16), ("feature_layers", [1, 2]), ("vocab_size", 999),
                       ("architecture", "Qwen3ForCausalLM")]:
        with pytest.raises(loading.FingerprintMismatch, match=f"\\({key}: drafter trained for"):
            loading.check_fingerprint(out, {**fp, key: value})
    loading.check_fingerprint(out, {**fp, "model_id": "/local/copy"}, ignore=("model_id",))
    config = json.loads((out / "config.json").read_text())
    loading.check_fingerprint(config, tiny_target)
    with pytest.raises(ArtifactError, match="no target_fingerprint"):
        loading.check_fingerprint({"block_size": 4}, tiny_target)


# --------------------------------------------------------------------------- corrupted artifacts
@pytest.fixture
def artifact_copy(exported, tmp_path):
    import shutil
    return shutil.copytree(exported[1], tmp_path / "copy")


def test_truncated_weights_named(artifact_copy):
    w = artifact_copy / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"model\.safetensors: corrupted or truncated"):
        art.load_artifact(artifact_copy)


def test_corrupted_header_named(artifact_copy):
    w = artifact_copy / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ArtifactError, match=r"model\.safetensors: corrupted or truncated"):
        art.load_artifact(artifact_copy)


def test_missing_tensor_and_pickle_refused(artifact_copy):
    w = artifact_copy / "model.safetensors"
    tensors = load_file(w)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, w)
    with pytest.raises(ArtifactError, match=f"missing keys.*{dropped}"):
        art.load_artifact(artifact_copy)
    save_file({**tensors, dropped: torch.zeros(3, *tensors[dropped].shape)}, w)
    with pytest.raises(ArtifactError, match=r"model\.safetensors: "):
        art.load_artifact(artifact_copy)
    w.unlink()
    torch.save(tensors, artifact_copy / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match="weights file not found.*pickle"):
        art.load_artifact(artifact_copy)


def test_newer_format_refused(artifact_copy):
    cfg = json.loads((artifact_copy / "config.json").read_text())
    (artifact_copy / "config.json").write_text(json.dumps({**cfg, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ArtifactError, match="format_version 2 is not one this dspark-train reads"):
        art.load_artifact(artifact_copy)


def test_newer_calibration_format_refused_naming_the_file(artifact_copy):
    cal = artifact_copy / "calibration.json"
    cal.write_text(json.dumps({**CALIBRATION, "format_version": 999}))
    with pytest.raises(ArtifactError, match=re.escape(f"{cal}: format_version 999 is not one this dspark-train")):
        art.load_artifact(artifact_copy)


def test_hub_id_goes_through_snapshot_download(exported, monkeypatch, tiny_target):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    calls = []

    def fake_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(exported[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    drafter = art.load_artifact("someone/dspark-tiny", target=tiny_target, revision="v1")
    assert calls[0][0] == "someone/dspark-tiny" and calls[0][1]["revision"] == "v1"
    assert calls[0][1]["repo_type"] == "model" and set(calls[0][1]["allow_patterns"]) == set(art.ARTIFACT_FILES)
    assert drafter.calibration == CALIBRATION

    def offline(repo_id, **kw):
        raise LocalEntryNotFoundError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ArtifactError, match="someone/dspark-tiny: not a local directory.*LocalEntryNotFoundError"):
        art.load_artifact("someone/dspark-tiny")
    with pytest.raises(ArtifactError, match="not a Hub model id"):
        art.load_artifact("no/such/dir")


# --------------------------------------------------------------------------- model card
def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, body = card[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def test_model_card_of_export(exported):
    _, out = exported
    meta, body = front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "dspark-train" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and "speculative-decoding" in meta["tags"] and "dspark" in meta["tags"]
    assert "base_model" not in meta  # an inline test target is not a Hub model
    assert "| gsm8k | 50 | 3.46 | 2.08× | 1.38× (bfloat16) | 41.5 | 20 | 24 | 0.61 | yes |" in body
    assert "| mt-bench | 80 | 2.25 | 1.50× | – |" in body
    assert "training run on cpu: AMD EPYC (avx2; no amx_bf16/avx512_bf16), 2 threads:" in body
    assert f"precision `auto` → `no` ({AMD} → fp32 training)" in body
    assert "- gsm8k: 0.80, 0.60, 0.40, 0.20" in body
    assert "on 8 held-out prompts (probe rounds, 120 drafted blocks, float32)" in body
    assert "       1 |    120 | sts T=1.25 b=+0.00   |    6.0% → 1.0%" in body and "depth threshold 0.31" in body
    assert "`final.loss`: 1.23" in body and "`tokens`: 12,345" in body
    assert "dspark eval" in body and "load_artifact(" in body and "--mode adaptive" in body
    assert "mode='adaptive'" in body and "SpeculativeDecoder(target, drafter, calibration=drafter.calibration)" in body
    assert "| tokenizer_hash |" in body and "20 steps" in body


def test_model_card_python_example_runs(exported, capsys):
    """The card's Python snippet, run as written against the exported artifact (fewer tokens)."""
    _, out = exported
    card = (out / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    exec(code.replace("path/to/artifact", str(out)).replace("max_new_tokens=256", "max_new_tokens=8"), {})
    assert capsys.readouterr().out.strip()


def test_model_card_without_report_or_calibration(tiny_recipe):
    config = {"kind": "dspark", "head": "none", "block_size": 8, "feature_layers": [1, 8, 14, 20, 27],
              "target_fingerprint": {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "hidden_size": 576}}
    recipe = {**tiny_recipe.to_dict(), "data": {"prompts_hub_id": "someone/prompts", "prompts": "train/x.jsonl"},
              "export": {"license": "mit"}}
    card = ex.render_model_card(config, recipe, repo_id="me/smol-dflash")
    meta, body = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "mit"
    assert meta["datasets"] == ["someone/prompts"] and "dflash" in meta["tags"]
    assert "# DFlash" in body and "up to 8 tokens" in body
    assert "τ" not in body.split("## Training")[0].split("## How to use")[1]  # no results table
    assert "## Calibration" not in body and "dspark eval me/smol-dflash" in body and "--mode chain" in body


# --------------------------------------------------------------------------- Hub push
@pytest.fixture
def artifact(tmp_path):
    """A minimal, valid artifact built by hand: push tests exercise the push, not the export."""
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "dspark_drafter", "format_version": 1,
                                                 "target_fingerprint": {"model_id": "org/target"}}))
    save_file({"w": torch.zeros(4, 4)}, out / "model.safetensors")
    (out / "README.md").write_text("---\nlibrary_name: dspark-train\n---\n# card\n")
    (out / "recipe.yaml").write_text("train: {}\n")
    (out / "notes.tmp").write_text("not part of the artifact")
    return out


class FakeApi:
    """Records the HfApi calls (class-level monkeypatch: the code builds its own HfApi)."""

    def __init__(self, monkeypatch, fail=None):
        import huggingface_hub
        self.calls = []
        for name in ("create_repo", "create_branch", "upload_folder"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, self._record(name, fail))

    def _record(self, name, fail):
        def method(api, *args, **kwargs):
            self.calls.append((name, args, kwargs, api.token))
            if fail == name:
                raise ConnectionError("could not reach huggingface.co with token hf_SECRET123")
            if name == "upload_folder":
                return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"})()
        return method

    def names(self):
        return [c[0] for c in self.calls]


def test_push_calls_hub_with_repo_type_private_branch_message(artifact, monkeypatch, capsys):
    api = FakeApi(monkeypatch)
    result = ex.push_artifact(artifact, "me/drafter", private=True, revision="v2", commit_message="first",
                              token="hf_SECRET123")
    assert api.names() == ["create_repo", "create_branch", "upload_folder"]
    (_, args, kw, tok), (_, bargs, bkw, _), (_, _, ukw, _) = api.calls
    assert args == ("me/drafter",) and kw == {"repo_type": "model", "private": True, "exist_ok": True}
    assert tok == "hf_SECRET123"
    assert bargs == ("me/drafter",) and bkw["branch"] == "v2" and bkw["repo_type"] == "model"
    assert ukw["repo_id"] == "me/drafter" and ukw["repo_type"] == "model" and ukw["revision"] == "v2"
    assert ukw["commit_message"] == "first" and ukw["folder_path"] == str(artifact)
    assert sorted(ukw["allow_patterns"]) == ["README.md", "config.json", "model.safetensors", "recipe.yaml"]
    assert result.commit_url.endswith("/commit/1") and not result.dry_run
    printed = capsys.readouterr().out
    assert "hf_SECRET123" not in printed and "me/drafter" in printed and "private" in printed


def test_push_default_branch_public(artifact, monkeypatch, capsys):
    api = FakeApi(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_ENVTOKEN")
    ex.push_artifact(artifact, "me/drafter")
    assert api.names() == ["create_repo", "upload_folder"]
    assert api.calls[0][2]["private"] is False and api.calls[1][2]["revision"] == "main"
    assert api.calls[0][3] == "hf_ENVTOKEN" and "hf_ENVTOKEN" not in capsys.readouterr().out


def test_dry_run_lists_files_and_touches_no_network(artifact, monkeypatch, capsys):
    api = FakeApi(monkeypatch)

    def no_network(*a, **k):
        raise AssertionError("network touched in --dry-run")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_TOKEN", "hf_DRYTOKEN")
    result = ex.push_artifact(artifact, "me/drafter", revision="exp", dry_run=True)
    assert api.calls == [] and result.dry_run
    out = capsys.readouterr().out
    assert "would upload 4 files" in out and "https://huggingface.co/me/drafter" in out and "branch exp" in out
    for name in ("config.json", "model.safetensors", "README.md", "recipe.yaml"):
        assert name in out
    assert "notes.tmp" not in out and "hf_DRYTOKEN" not in out and "token: found" in out


def test_push_without_token_is_clear(artifact, monkeypatch, tmp_path):
    api = FakeApi(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    with pytest.raises(ex.PushError, match="no Hugging Face token.*HF_TOKEN"):
        ex.push_artifact(artifact, "me/drafter")
    assert api.calls == []


def test_push_network_failure_is_not_success(artifact, monkeypatch, capsys):
    FakeApi(monkeypatch, fail="upload_folder")
    with pytest.raises(ex.PushError, match="push to me/drafter failed, nothing reported as uploaded") as e:
        ex.push_artifact(artifact, "me/drafter", token="hf_SECRET123")
    assert "hf_SECRET123" not in str(e.value) and "***" in str(e.value)
    assert "uploaded 4 files" not in capsys.readouterr().out


def test_push_refuses_bad_artifact_or_repo(artifact, monkeypatch):
    api = FakeApi(monkeypatch)
    with pytest.raises(ex.ArtifactError, match="invalid Hub repo id"):
        ex.push_artifact(artifact, "bad repo id!", dry_run=True)
    w = artifact / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-8])
    with pytest.raises(ex.ArtifactError, match="model.safetensors: corrupted or truncated"):
        ex.push_artifact(artifact, "me/drafter", token="t")
    os.remove(artifact / "README.md")
    with pytest.raises(ex.ArtifactError, match="no README.md"):
        ex.push_artifact(artifact, "me/drafter", token="t")
    assert api.calls == []
