"""The drafter artifact: export from a training run, load (with the target fingerprint check), model card, Hub push.

An artifact is a directory that `Drafter.from_pretrained` reads, plus what a user needs around it:

    config.json        drafter config: architecture, block size, feature layers, `format_version`,
                       `target_fingerprint` (model id/revision, architecture, layers, hidden/vocab size,
                       feature layers, tokenizer hash)
    model.safetensors  drafter weights only (the target's embedding and LM head are shared at load time)
    calibration.json   STS temperatures, adaptive-k thresholds, cost profile (only when calibrated)
    recipe.yaml        the resolved recipe it was trained with
    README.md          model card with Hub metadata

Export writes into a temporary sibling directory and renames it into place, so an interrupted export never
leaves a half-written artifact. Weights are safetensors only: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from .config import RecipeError
from .drafters.config import FORMAT_VERSION

CONFIG, WEIGHTS, CALIBRATION = "config.json", "model.safetensors", "calibration.json"
RECIPE, CARD = "recipe.yaml", "README.md"
ARTIFACT_FILES = (CONFIG, WEIGHTS, CALIBRATION, RECIPE, CARD)  # what an artifact may hold, and all that is pushed
FINGERPRINT_FIELDS = ("model_id", "revision", "architecture", "num_hidden_layers", "hidden_size", "vocab_size",
                      "feature_layers", "tokenizer_hash")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ArtifactError(RecipeError):
    """A missing, malformed or mismatched artifact: the one-line message names the file or the field (the CLI
    prints it and exits 2, as for a bad recipe)."""


class FingerprintMismatch(ArtifactError):
    """The artifact was trained against a different target than the one it is being loaded with."""


class PushError(RecipeError):
    """The Hub upload did not happen or did not complete; nothing is reported as uploaded (CLI: exit 2)."""


# --------------------------------------------------------------------------- small file helpers
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def _optional_json(path: Path) -> Optional[dict]:
    return _read_json(path) if path.is_file() else None


def _check_safetensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Open the header (this also catches truncation: every tensor's bytes must lie inside the file).
    Returns {name: (dtype, shape)}."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        hint = " (pickle checkpoints are not loaded: save with safetensors)" if any(
            path.with_name(n).exists() for n in ("pytorch_model.bin", "model.bin")) else ""
        raise ArtifactError(f"{path}: weights file not found{hint}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: corrupted or truncated safetensors file ({e}); re-export or re-download it") \
            from None


# --------------------------------------------------------------------------- fingerprint
def _recorded_fingerprint(obj) -> dict:
    """The target fingerprint a drafter, its config (object or dict) or an artifact/run directory records."""
    if isinstance(obj, (str, Path)):
        obj = _read_json(_weights_dir(Path(obj)) / CONFIG)
    obj = getattr(obj, "config", obj)  # a Drafter
    fp = obj.get("target_fingerprint") if isinstance(obj, dict) else getattr(obj, "target_fingerprint", None)
    if not isinstance(fp, dict) or not fp:
        raise ArtifactError("the drafter config records no target_fingerprint; cannot check it against the target")
    return fp


def check_fingerprint(drafter_config_or_artifact, target, ignore: Iterable[str] = ()) -> None:
    """Refuse a target the drafter was not trained for. `target`: a FrozenTarget or its fingerprint dict.

    Every recorded field must match; `revision` only when both sides pin one. `ignore` names fields to skip,
    e.g. ("model_id",) for the same model loaded from a local copy under another name."""
    recorded = _recorded_fingerprint(drafter_config_or_artifact)
    actual = target if isinstance(target, dict) else target.fingerprint()
    ignore = set(ignore)
    diffs = []
    for key in sorted(recorded, key=lambda k: (k not in FINGERPRINT_FIELDS, k)):  # what the drafter recorded
        a, b = recorded.get(key), actual.get(key)
        if key in ignore or (key == "revision" and (a is None or b is None)):
            continue
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            diffs.append(f"{key}: drafter trained for {a!r}, target has {b!r}")
    if diffs:
        raise FingerprintMismatch("drafter does not match this target (" + "; ".join(diffs) + ")")


# --------------------------------------------------------------------------- loading
def _weights_dir(path: Path) -> Path:
    """An artifact holds config.json itself; a training run holds it in final/."""
    if (path / CONFIG).is_file():
        return path
    if (path / "final" / CONFIG).is_file():
        return path / "final"
    raise ArtifactError(f"{path}: no {CONFIG} (neither an artifact nor a finished training run with final/)")


def resolve_artifact(path_or_hub_id: str | Path, revision: Optional[str] = None, token: Optional[str] = None) -> Path:
    """A local artifact or run directory as is; otherwise a Hub model id, downloaded with snapshot_download."""
    p = Path(path_or_hub_id).expanduser()
    if p.exists():
        return p
    name = str(path_or_hub_id)
    if not HUB_ID.match(name):
        raise ArtifactError(f"{name}: no such directory, and not a Hub model id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HTTPError

    try:
        return Path(snapshot_download(name, repo_type="model", revision=revision, token=token,
                                      allow_patterns=list(ARTIFACT_FILES)))
    except (OSError, HTTPError, ValueError) as e:
        raise ArtifactError(f"{name}: not a local directory, and downloading it from the Hub failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_drafter(weights_dir: Path):
    """`Drafter.from_pretrained` from safetensors only, refusing missing, extra or misshapen tensors
    (transformers would only warn and initialise them randomly)."""
    from .drafters import Drafter

    config = _read_json(weights_dir / CONFIG)
    version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{weights_dir / CONFIG}: format_version {version!r} is not one this "
                            f"dspark-train reads (1..{FORMAT_VERSION}); upgrade dspark-train")
    weights = weights_dir / WEIGHTS
    _check_safetensors(weights)
    try:
        drafter, info = Drafter.from_pretrained(weights_dir, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{weights}: cannot load the drafter ({type(e).__name__}: {e})") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:5]}" for k, v in bad.items())
        raise ArtifactError(f"{weights}: does not fit the drafter in {CONFIG} ({detail})")
    return drafter.eval()


def load_artifact(path_or_hub_id: str | Path, target=None, revision: Optional[str] = None,
                  ignore: Iterable[str] = (), token: Optional[str] = None):
    """Load an exported artifact (local directory or Hub id) or a training run's final drafter.

    Returns the Drafter (eval mode) with `.calibration` set to calibration.json's dict, or None when the
    artifact is uncalibrated. With a target: check the fingerprint (FingerprintMismatch names the field),
    move the drafter to the target's device and attach the target's frozen embedding and LM head."""
    from .speculators import is_speculators_dir, load_speculators

    root = resolve_artifact(path_or_hub_id, revision, token)
    speculators = is_speculators_dir(root)  # a `dspark export --format speculators` directory reads back too
    drafter = load_speculators(root) if speculators else load_drafter(_weights_dir(root))
    if target is not None:
        if not speculators or drafter.config.target_fingerprint:  # foreign speculators files record none
            check_fingerprint(drafter, target, ignore)
        drafter.to(target.device)
        drafter.attach_target(target)
    drafter.calibration = _optional_json(root / CALIBRATION)
    return drafter


# --------------------------------------------------------------------------- export
def _finish_tree(path: Path) -> None:
    """Ordinary permissions (mkdtemp makes the directory private) and everything on disk before the rename."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for f in path.iterdir():
        f.chmod(0o666 & ~umask)
        with open(f, "rb") as h:
            os.fsync(h.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_run(run_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write the artifact for a finished training run into out_dir (atomically); returns out_dir."""
    run, out = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    if not (run / "final" / CONFIG).is_file():
        raise ArtifactError(f"{run}: no final/{CONFIG}; is this a finished training run directory?")
    if not (run / RECIPE).is_file():
        raise ArtifactError(f"{run}: no {RECIPE} (the resolved recipe the trainer writes)")
    r_run, r_out = run.resolve(), out.resolve()
    if r_run == r_out or r_out in r_run.parents or r_out == r_run / "final" or (r_run / "final") in r_out.parents:
        raise ArtifactError(f"{out}: would overwrite the training run itself; choose another OUT_DIR")
    if out.exists() and not force:
        raise ArtifactError(f"{out}: already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a directory")

    # read and validate every input before writing anything
    drafter = load_drafter(run / "final")
    _recorded_fingerprint(drafter)
    recipe_text = (run / RECIPE).read_text()
    try:
        recipe = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError as e:
        raise ArtifactError(f"{run / RECIPE}: invalid YAML ({e})") from None
    calibration = _optional_json(run / CALIBRATION)
    report = _optional_json(run / "eval" / "report.json")
    summary = _optional_json(run / "train_summary.json")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        drafter.save_pretrained(tmp)
        config = _read_json(tmp / CONFIG)
        tensors = _check_safetensors(tmp / WEIGHTS)
        (tmp / RECIPE).write_text(recipe_text)
        if calibration is not None:
            shutil.copyfile(run / CALIBRATION, tmp / CALIBRATION)
        (tmp / CARD).write_text(render_model_card(config, recipe, calibration=calibration, report=report,
                                                  summary=summary, num_parameters=_count_parameters(tensors)))
        _finish_tree(tmp)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.rename(old, out)  # interrupted between the two renames: put the previous artifact back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def _count_parameters(tensors: dict[str, tuple[str, list[int]]]) -> int:
    """Trainable-size figure for the card: floating-point tensors only (the int draft-vocab map is not one)."""
    return sum(math.prod(shape) for dtype, shape in tensors.values() if "F" in dtype.upper())


# --------------------------------------------------------------------------- model card
HEAD_NAMES = {"markov": "DSpark (Markov head)", "rnn": "DSpark (RNN head)",
              "none": "DFlash (parallel block, no sequential head)"}


def _is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _scalar_lines(d: dict, prefix: str = "", depth: int = 0) -> list[str]:
    """`- key: value` for scalars and short numeric lists of a dict whose schema this module does not own
    (calibration, training summary); long arrays are summarised by their length."""
    lines = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth < 2:
            lines += _scalar_lines(v, f"{key}.", depth + 1)
        elif isinstance(v, list) and len(v) > 16:
            lines.append(f"- `{key}`: {len(v)} values")
        elif not isinstance(v, (dict, list)) or all(not isinstance(x, (dict, list)) for x in v):
            lines.append(f"- `{key}`: {_fmt(v)}")
    return lines


def _front_matter(config: dict, recipe: dict) -> dict:
    fp = config.get("target_fingerprint") or {}
    data = recipe.get("data") or {}
    kind, head = config.get("kind", "dspark"), config.get("head")
    meta: dict[str, Any] = {}
    if _is_hub_id(fp.get("model_id")):
        meta["base_model"] = fp["model_id"]
    meta["library_name"] = "dspark-train"
    meta["pipeline_tag"] = "text-generation"
    meta["license"] = (recipe.get("export") or {}).get("license") or "apache-2.0"
    tags = ["dspark-train", "speculative-decoding", "drafter",
            "medusa" if kind == "medusa" else ("dflash" if head == "none" else "dspark")]
    if kind != "medusa" and head and head != "none":
        tags.append(f"{head}-head")
    meta["tags"] = tags
    datasets = [d for d in (data.get("prompts_hub_id"), data.get("prompts")) if _is_hub_id(d)
                and not str(d).endswith((".jsonl", ".json", ".parquet"))]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    return meta


def _results_section(report: dict) -> list[str]:
    benches = report.get("benchmarks") or {}
    if not benches:
        return []
    baseline_names = sorted({n for b in benches.values() for n in (b.get("baselines") or {})})
    head = ["Benchmark", "prompts", "τ", "speedup", "tokens/s", "plain tokens/s"] + \
        [f"{n} tokens/s" for n in baseline_names] + ["verify rate", "lossless"]
    lines = ["## Measured acceptance and speedup", "",
             "From `eval/report.json` of the training run: "
             + ", ".join(f"{k} {_fmt(report.get(k))}" for k in ("mode", "temperature", "dtype", "device")
                         if report.get(k) is not None) + ". τ counts the bonus token; speedup is wall-clock "
             "tokens/s against plain decoding of the same target in the same run.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, b in benches.items():
        speedup = b.get("speedup")
        row = [name, _fmt(b.get("n_prompts")), _fmt(b.get("tau")),
               f"{speedup:.2f}×" if isinstance(speedup, (int, float)) else "–",
               _fmt(b.get("tokens_per_s")), _fmt(b.get("baseline_tokens_per_s"))]
        row += [_fmt(((b.get("baselines") or {}).get(n) or {}).get("tokens_per_s")) for n in baseline_names]
        row += [_fmt(b.get("verify_rate")), _fmt(b.get("lossless"))]
        lines.append("| " + " | ".join(row) + " |")
    accept = {n: b["accept_rate_by_position"] for n, b in benches.items() if b.get("accept_rate_by_position")}
    if accept:
        lines += ["", "Acceptance by draft position (prefix survival):", ""]
        lines += [f"- {n}: " + ", ".join(f"{x:.2f}" for x in v) for n, v in accept.items()]
    return lines + [""]


def render_model_card(config: dict, recipe: dict, calibration: Optional[dict] = None, report: Optional[dict] = None,
                      summary: Optional[dict] = None, num_parameters: Optional[int] = None,
                      repo_id: Optional[str] = None) -> str:
    """README.md for the artifact: Hub YAML front matter, then what it is, how to use it, results, training."""
    fp = config.get("target_fingerprint") or {}
    recipe = recipe or {}
    target_id = fp.get("model_id", "the target")
    kind = "Medusa" if config.get("kind") == "medusa" else HEAD_NAMES.get(config.get("head"), "DSpark")
    gamma = config.get("block_size")
    where = repo_id or (recipe.get("export") or {}).get("repo_id") or "path/to/artifact"
    front = yaml.safe_dump(_front_matter(config, recipe), sort_keys=False, allow_unicode=True)

    proposes = f"up to {gamma} tokens per round" if gamma else "several tokens per round"
    lines = ["---", front.rstrip(), "---", "", f"# {kind} drafter for {target_id}", "",
             f"A speculative-decoding drafter trained with dspark-train against `{target_id}`. It proposes "
             f"{proposes} from the target's own hidden states; the target verifies them in one forward pass, so "
             "the output is exactly what the target alone would produce (lossless), only faster."]
    lines += ["", "The file holds the drafter's weights only"
              + (f" ({num_parameters / 1e6:.1f} M parameters)" if num_parameters else "")
              + ": the target's token embedding and LM head are shared with the drafter at load time, so it "
              "works only with the target it was trained for. Loading checks this target fingerprint and "
              "refuses a mismatch, naming the field:", "",
              "| field | value |", "|---|---|"]
    lines += [f"| {k} | `{_fmt(fp.get(k))}` |" for k in FINGERPRINT_FIELDS if k in fp]
    if _is_hub_id(target_id):
        imports = ["from dspark_train.config import TargetConfig"]
        make_target = f"target = load_target(TargetConfig(model={target_id!r}))"
    else:  # not a Hub model: the recipe the drafter was trained with says how to build the target
        imports = ["from dspark_train.config import load_recipe"]
        make_target = f"target = load_target(load_recipe({where + '/' + RECIPE!r}).target)"
    imports += ["from dspark_train.chat import prompt_ids", "from dspark_train.decoding import SpeculativeDecoder",
                "from dspark_train.export import load_artifact", "from dspark_train.target import load_target"]
    mode = "adaptive" if calibration else "chain"
    lines += ["", "## How to use", "", "With dspark-train installed:", "", "```bash",
              f"dspark eval {where} --benchmarks gsm8k,mt-bench,humaneval,mbpp --mode {mode}",
              "```", "", "`--target` defaults to the target named in the artifact's `recipe.yaml`. From Python:", "",
              "```python", *sorted(imports), "", make_target,
              f"drafter = load_artifact({where!r}, target=target)  # refuses a different target",
              "decoder = SpeculativeDecoder(target, drafter, calibration=drafter.calibration)",
              "ids = prompt_ids(target.tokenizer, [{\"role\": \"user\", \"content\": \"Why is the sky blue?\"}])",
              f"out = decoder.generate(ids, max_new_tokens=256, mode={mode!r})  # greedy: same ids as the target",
              "print(target.tokenizer.decode(out.tokens), out.tau)",
              "```", ""]
    if report:
        lines += _results_section(report)
    if calibration:
        lines += _calibration_section(calibration)
    lines += _training_section(config, recipe, summary)
    lines += ["## Files", "",
              f"- `{CONFIG}`: drafter config (`format_version` {config.get('format_version', FORMAT_VERSION)}, "
              "`target_fingerprint`)",
              f"- `{WEIGHTS}`: drafter weights (safetensors)"]
    if calibration:
        lines.append(f"- `{CALIBRATION}`: temperatures, adaptive-k thresholds, cost profile")
    lines += [f"- `{RECIPE}`: the resolved training recipe", ""]
    return "\n".join(lines)


def _calibration_section(calibration: dict) -> list[str]:
    from .calibrate import Calibration, summary_table

    try:
        cal = Calibration.from_json(calibration)
        table = summary_table(cal)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise ArtifactError(f"{CALIBRATION}: not a calibration this dspark-train reads ({type(e).__name__}: {e})") \
            from None
    d = cal.data
    sts = d.get("sts") or {}
    fitted = f" on {_fmt(d['n_prompts'])} held-out prompts ({sts.get('source', 'decoding rounds')}, " \
        f"{_fmt(sts.get('blocks'))} drafted blocks" + (f", {d['dtype']}" if d.get("dtype") else "") + ")" \
        if d.get("n_prompts") else ""
    return ["## Calibration", "",
            f"Confidence calibrated with sequential temperature scaling{fitted}; the adaptive policy below was "
            "tuned for expected tokens per second on this machine's cost profile (`calibration.json`, read by "
            "the decoder's `adaptive` mode). The cost profile is machine-specific: re-run `dspark calibrate` on "
            "other hardware.", "", "```", table, "```", ""]


def _training_section(config: dict, recipe: dict, summary: Optional[dict]) -> list[str]:
    d, t, dist = recipe.get("drafter") or {}, recipe.get("train") or {}, recipe.get("distributed") or {}
    data = recipe.get("data") or {}
    lines = ["## Training", ""]
    source = data.get("conversations") or data.get("prompts_hub_id") or data.get("prompts")
    if source:
        lines.append(f"- data: `{source}` (answers regenerated by the target itself), "
                     f"max {_fmt(data.get('max_seq_len'))} tokens per sequence, "
                     f"{_fmt(data.get('anchors_per_seq'))} anchor blocks per sequence")
    if d:
        gamma = config.get("block_size", d.get("block_size"))
        lines.append(f"- drafter: kind `{d.get('kind')}`, head `{d.get('head')}`, "
                     f"{_fmt(d.get('num_layers'))} layer(s), block size γ = {_fmt(gamma)}, head rank "
                     f"{_fmt(d.get('head_rank'))}, feature layers {_fmt(config.get('feature_layers'))}")
    if t:
        batch = (t.get("batch_size") or 0) * (t.get("grad_accum") or 1) * (dist.get("num_processes") or 1)
        lines.append(f"- optimisation: {_fmt(t.get('max_steps'))} steps, lr {_fmt(t.get('lr'))} "
                     f"(warmup {_fmt(t.get('warmup_ratio'))}, cosine), global batch {batch} sequences, "
                     f"precision `{t.get('mixed_precision')}`")
        lines.append(f"- loss: {_fmt(t.get('ce_weight'))}·CE + {_fmt(t.get('l1_weight'))}·L1 + "
                     f"{_fmt(t.get('conf_weight'))}·confidence BCE, position decay λ = {_fmt(t.get('decay_lambda'))}")
    if summary:
        lines += ["", "Run summary (`train_summary.json`):", ""] + _scalar_lines(summary)
    return lines + [""]


# --------------------------------------------------------------------------- Hub push
@dataclass
class PushResult:
    repo_id: str
    revision: str
    private: bool
    files: list[tuple[str, int]]  # (name, bytes)
    commit_message: str
    dry_run: bool
    commit_url: Optional[str] = None

    def describe(self) -> str:
        total = sum(n for _, n in self.files)
        verb = "would upload" if self.dry_run else "uploaded"
        head = (f"{verb} {len(self.files)} files ({_size(total)}) to https://huggingface.co/{self.repo_id} "
                f"(model repo, {'private' if self.private else 'public'}, branch {self.revision}):")
        body = [f"  {name:<20} {_size(n):>10}" for name, n in self.files]
        tail = [f"commit message: {self.commit_message}"]
        if self.commit_url:
            tail.append(f"commit: {self.commit_url}")
        return "\n".join([head, *body, *tail])


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def push_artifact(out_dir: str | Path, repo_id: str, private: bool = False, revision: Optional[str] = None,
                  commit_message: Optional[str] = None, dry_run: bool = False,
                  token: Optional[str] = None) -> PushResult:
    """Upload an artifact with huggingface_hub (create_repo, create_branch when needed, upload_folder).

    Prints what it uploads and where. The token comes from `token`, else HF_TOKEN or the stored login; it is
    never printed. dry_run checks the artifact and lists the files without touching the network."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HTTPError
    from huggingface_hub.utils import validate_repo_id

    out = Path(out_dir).expanduser()
    if not out.is_dir():
        raise ArtifactError(f"{out}: artifact directory not found")
    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise ArtifactError(f"{repo_id}: invalid Hub repo id ({e})") from None
    for name in (CONFIG, WEIGHTS, CARD):
        if not (out / name).is_file():
            raise ArtifactError(f"{out}: no {name}; export the run first (`dspark export RUN_DIR {out}`)")
    _recorded_fingerprint(_read_json(out / CONFIG))
    _check_safetensors(out / WEIGHTS)
    files = [(n, (out / n).stat().st_size) for n in ARTIFACT_FILES if (out / n).is_file()]
    branch = revision or "main"
    message = commit_message or f"Upload dspark-train drafter ({', '.join(n for n, _ in files)})"
    result = PushResult(repo_id, branch, private, files, message, dry_run)
    if dry_run:
        print(result.describe())
        found = token or get_token()
        print("token: " + ("found" if found else "none found (a real push needs HF_TOKEN or `hf auth login`)"))
        return result

    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (nothing was uploaded)")
    api = HfApi(token=token)
    print(f"uploading {len(files)} files to https://huggingface.co/{repo_id} (branch {branch}) ...", flush=True)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(out), repo_type="model", revision=branch,
                                 commit_message=message, allow_patterns=[n for n, _ in files])
    except (OSError, HTTPError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise PushError(f"push to {repo_id} failed, nothing reported as uploaded "
                        f"({type(e).__name__}: {detail.replace(token, '***')})") from None
    result.commit_url = getattr(info, "commit_url", None) or str(info)
    result.dry_run = False
    print(result.describe())
    return result
