"""`dspark export` and `dspark push`: write the artifact of a finished training run (weights, resolved recipe,
calibration, model card), render its model card, upload it to the Hub.

The artifact's files and its read side (load, fingerprint check) are artifact.py's; calibration.json's schema
is calibration.py's. Export writes into a temporary sibling directory and renames it into place
(`layout.replace_dir`), so an interrupted export never leaves a half-written artifact.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .artifact import (
    ARTIFACT_FILES,
    CARD,
    CONFIG,
    FINGERPRINT_FIELDS,
    FORMAT_VERSION,
    HUB_ID,
    WEIGHTS,
    check_safetensors,
    load_drafter,
    recorded_fingerprint,
)
from .calibration import Calibration, read_calibration, summary_table
from .config import RecipeError
from .layout import CALIBRATION, EVAL, RECIPE, TRAIN_SUMMARY, ArtifactError, RunDir, read_json, replace_dir
from .report import REPORT_JSON


class PushError(RecipeError):
    """The Hub upload did not happen or did not complete; nothing is reported as uploaded (CLI: exit 2)."""


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
    run, out = RunDir(run_dir), Path(out_dir).expanduser()
    if not (run.final / CONFIG).is_file():
        raise ArtifactError(f"{run.root}: no {run.final.name}/{CONFIG}; is this a finished training run directory?")
    if not run.recipe.is_file():
        raise ArtifactError(f"{run.root}: no {RECIPE} (the resolved recipe the trainer writes)")
    r_run, r_out = run.root.resolve(), out.resolve()
    r_final = run.final.resolve()
    if r_run == r_out or r_out in r_run.parents or r_out == r_final or r_final in r_out.parents:
        raise ArtifactError(f"{out}: would overwrite the training run itself; choose another OUT_DIR")
    if out.exists() and not force:
        raise ArtifactError(f"{out}: already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a directory")

    # read and validate every input before writing anything
    drafter = load_drafter(run.final)
    recorded_fingerprint(drafter)
    recipe_text = run.recipe.read_text()
    try:
        recipe = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError as e:
        raise ArtifactError(f"{run.recipe}: invalid YAML ({e})") from None
    calibration = read_calibration(run.calibration) if run.calibration.is_file() else None
    report = _optional_json(run.eval / REPORT_JSON)
    summary = _optional_json(run.train_summary)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        drafter.save_pretrained(tmp)
        config = read_json(tmp / CONFIG)
        tensors = check_safetensors(tmp / WEIGHTS)
        (tmp / RECIPE).write_text(recipe_text)
        if calibration is not None:
            shutil.copyfile(run.calibration, tmp / CALIBRATION)
        (tmp / CARD).write_text(render_model_card(config, recipe, calibration=calibration, report=report,
                                                  summary=summary, num_parameters=_count_parameters(tensors)))
        _finish_tree(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _optional_json(path: Path) -> Optional[dict]:
    return read_json(path) if path.is_file() else None


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


def _scalar_lines(values: dict, prefix: str = "", depth: int = 0) -> list[str]:
    """`- key: value` for scalars and short numeric lists of a dict whose schema this module does not own
    (calibration, training summary); long arrays are summarised by their length."""
    lines = []
    for k, v in values.items():
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
    datasets = [name for name in (data.get("prompts_hub_id"), data.get("prompts")) if _is_hub_id(name)
                and not str(name).endswith((".jsonl", ".json", ".parquet"))]
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
             f"From `{EVAL}/{REPORT_JSON}` of the training run: "
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
                "from dspark_train.artifact import load_artifact", "from dspark_train.target import load_target"]
    mode = "adaptive" if calibration else "chain"
    lines += ["", "## How to use", "", "With dspark-train installed:", "", "```bash",
              f"dspark eval {where} --benchmarks gsm8k,mt-bench,humaneval,mbpp --mode {mode}",
              "```", "", f"`--target` defaults to the target named in the artifact's `{RECIPE}`. From Python:", "",
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
    try:
        cal = Calibration.from_json(calibration)
        table = summary_table(cal)
        other = [f"{m.kind} at position {k + 1}" for k, m in enumerate(cal.slot_maps()) if m.kind != "sts"]
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise ArtifactError(f"{CALIBRATION}: not a calibration this dspark-train reads ({type(e).__name__}: {e})") \
            from None
    data = cal.data
    sts = data.get("sts") or {}
    fitted = f" on {_fmt(data['n_prompts'])} held-out prompts ({sts.get('source', 'decoding rounds')}, " \
        f"{_fmt(sts.get('blocks'))} drafted blocks" + (f", {data['dtype']}" if data.get("dtype") else "") + ")" \
        if data.get("n_prompts") else ""
    return ["## Calibration", "",
            f"Confidence calibrated with sequential temperature scaling{fitted}"
            + (f" ({', '.join(other)}: a per-slot order-preserving map with a lower cross-fitted ECE)" if other else "")
            + "; the adaptive policy below was "
            f"tuned for expected tokens per second on this machine's cost profile (`{CALIBRATION}`, read by "
            "the decoder's `adaptive` mode). The cost profile is machine-specific: re-run `dspark calibrate` on "
            "other hardware.", "", "```", table, "```", ""]


def _training_section(config: dict, recipe: dict, summary: Optional[dict]) -> list[str]:
    drafter, train = recipe.get("drafter") or {}, recipe.get("train") or {}
    dist = recipe.get("distributed") or {}
    data = recipe.get("data") or {}
    lines = ["## Training", ""]
    source = data.get("conversations") or data.get("prompts_hub_id") or data.get("prompts")
    if source:
        lines.append(f"- data: `{source}` (answers regenerated by the target itself), "
                     f"max {_fmt(data.get('max_seq_len'))} tokens per sequence, "
                     f"{_fmt(data.get('anchors_per_seq'))} anchor blocks per sequence")
    if drafter:
        gamma = config.get("block_size", drafter.get("block_size"))
        lines.append(f"- drafter: kind `{drafter.get('kind')}`, head `{drafter.get('head')}`, "
                     f"{_fmt(drafter.get('num_layers'))} layer(s), block size γ = {_fmt(gamma)}, head rank "
                     f"{_fmt(drafter.get('head_rank'))}, feature layers {_fmt(config.get('feature_layers'))}")
    if train:
        batch = (train.get("batch_size") or 0) * (train.get("grad_accum") or 1) * (dist.get("num_processes") or 1)
        lines.append(f"- optimisation: {_fmt(train.get('max_steps'))} steps, lr {_fmt(train.get('lr'))} "
                     f"(warmup {_fmt(train.get('warmup_ratio'))}, cosine), global batch {batch} sequences, "
                     f"precision `{train.get('mixed_precision')}`")
        lines.append(f"- loss: {_fmt(train.get('ce_weight'))}·CE + {_fmt(train.get('l1_weight'))}·L1 + "
                     f"{_fmt(train.get('conf_weight'))}·confidence BCE, "
                     f"position decay λ = {_fmt(train.get('decay_lambda'))}")
    if summary:
        lines += ["", f"Run summary (`{TRAIN_SUMMARY}`):", ""] + _scalar_lines(summary)
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
    recorded_fingerprint(read_json(out / CONFIG))
    check_safetensors(out / WEIGHTS)
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
