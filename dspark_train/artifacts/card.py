"""The artifact's model card (README.md with Hub metadata): what the drafter is, the target it is bound to (the
fingerprint), how to use it, measured results, calibration and training, rendered from the files export
gathers. Values of dicts whose schema this module does not own (train summary, report) are shown as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from .reader import HUB_ID
from ..drafters.config import FORMAT_VERSION
from ..drafters.loading import FINGERPRINT_FIELDS
from ..policy.calibration import Calibration, summary_table
from ..hardware import Capabilities
from ..layout import CALIBRATION, CONFIG, EVAL, RECIPE, REPORT_JSON, TRAIN_SUMMARY, WEIGHTS, ArtifactError


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
    hub = data.get("prompts_hub_id") or []
    used = [data.get("prompts")] + ([] if data.get("conversations") else [hub] if isinstance(hub, str) else hub)
    datasets = [name.split(":")[0] for name in used if isinstance(name, str) and _is_hub_id(name.split(":")[0])
                and not name.endswith((".jsonl", ".json", ".parquet"))]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    return meta


def _results_section(report: dict) -> list[str]:
    benches = report.get("benchmarks") or {}
    if not benches:
        return []
    baseline_names = sorted({n for b in benches.values() for n in (b.get("baselines") or {})})
    head = ["Benchmark", "prompts", "τ", "speedup", "× fastest plain", "tokens/s", "plain tokens/s"] + \
        [f"{n} tokens/s" for n in baseline_names] + ["verify rate", "lossless"]
    machine = report.get("machine")
    where = f" on {Capabilities.from_dict(machine).describe()}" if machine else ""
    lines = ["## Measured acceptance and speedup", "",
             f"From `{EVAL}/{REPORT_JSON}` of the training run{where}: "
             + ", ".join(f"{k} {_fmt(report.get(k))}" for k in ("mode", "temperature", "dtype", "device")
                         if report.get(k) is not None) + ". τ counts the bonus token; speedup is wall-clock "
             "tokens/s against plain decoding of the same target at the same precision in the same run; "
             "× fastest plain is against the fastest plain decoding measured there among float32/bfloat16 "
             "(on a CPU without bf16 units the two precisions differ in speed, hardware.py).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def times(x) -> str:
        return f"{x:.2f}×" if isinstance(x, (int, float)) else "–"
    for name, b in benches.items():
        fastest = b.get("fastest_plain") or {}
        row = [name, _fmt(b.get("n_prompts")), _fmt(b.get("tau")), times(b.get("speedup")),
               times(b.get("speedup_vs_fastest_plain")) + (f" ({fastest['dtype']})" if fastest else ""),
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
        imports = ["from dspark_train.runrecord import read_run"]
        make_target = f"target = load_target(read_run({where!r}).target)"
    imports += ["from dspark_train.data.chat import prompt_ids", "from dspark_train.decoding import SpeculativeDecoder",
                "from dspark_train.artifacts.reader import load_artifact",
                "from dspark_train.target import load_target"]
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
        lines.append(f"- `{CALIBRATION}`: per-slot calibration maps, adaptive-k thresholds, cost profile")
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
    source = data.get("conversations") or data.get("prompts")
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
        mixed = ((summary or {}).get("hardware") or {}).get("mixed_precision") or {}
        precision = f"`{train.get('mixed_precision')}`" + (
            f" → `{mixed['value']}` ({mixed['reason']})" if mixed.get("setting") == "auto" else "")
        lines.append(f"- optimisation: {_fmt(train.get('max_steps'))} steps, lr {_fmt(train.get('lr'))} "
                     f"(warmup {_fmt(train.get('warmup_ratio'))}, cosine), global batch {batch} sequences, "
                     f"precision {precision}")
        lines.append(f"- loss: {_fmt(train.get('ce_weight'))}·CE + {_fmt(train.get('l1_weight'))}·L1 + "
                     f"{_fmt(train.get('conf_weight'))}·confidence BCE, "
                     f"position decay λ = {_fmt(train.get('decay_lambda'))}")
    if summary:
        lines += ["", f"Run summary (`{TRAIN_SUMMARY}`):", ""] + _scalar_lines(summary)
    return lines + [""]
