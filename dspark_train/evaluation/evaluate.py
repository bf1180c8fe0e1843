"""`dspark eval`: τ, per-position acceptance and wall-clock speedup of drafters against plain decoding.

Every method (plain target ``generate``, each drafter's speculative decoder, transformers' prompt-lookup and
assisted generation) runs on the same prompt back to back, in an order rotated per prompt, so machine drift
cancels instead of biasing one method. Plain decoding also runs in the other of float32/bfloat16, so each
speedup is given twice: against plain decoding at the same precision (the papers' convention) and against the
fastest plain decoding this machine offers (what a user would otherwise run; hardware.py explains why the two
differ on CPUs without bf16 units). This module measures; report.py holds the report's fields (the
binding schema of docs/method.md §7), report.md and the plots; lossless.py shows each greedy output is plain
decoding's. The library takes an `EvalConfig` (settings.py, whose fields cli.py turns into the flags).

Long because one `dspark eval` run is one sequence (settings, benchmark files, the methods it times side by
side, the measuring loop, each benchmark's entry) over one EvalConfig and one sample layout; the report's fields
(report.py) and the lossless checks (lossless.py) already live apart.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import transformers
from tqdm import tqdm
from transformers import LogitsProcessorList

from ..artifacts.reader import load_artifact, resolve_artifact
from ..data.chat import prompt_ids, stop_token_ids, user_messages
from ..config import RecipeError, TargetConfig, load_recipe
from ..decoding import SpeculativeDecoder
from ..decoding.record import PassRecord
from ..decoding.rules import generation_rules, plain_overrides
from ..hardware import AUTO_DTYPES, detect
from ..layout import (ARTIFACT, CALIBRATION, FINAL, OUTPUTS, REPORT_JSON, REPORT_MD, DataFileError,
                      iter_jsonl)
from .expectation import add_tuner_checks
from .lossless import Checked, LosslessError, Recording, checks_of, exact_attention_choice, judge, verdict
from .settings import BASELINES, BENCHMARKS, DECODER_BASELINES, EvalConfig
from .report import (RoundStat, Sample, assemble, fastest_plain, lossless_errors, method_metrics,
                     render_markdown, speedup_over, write_outputs, write_report)
from ..runlock import holds_lock
from ..runrecord import target_of
from ..target import PromptTooLong, load_target

PLAIN = "plain"


def plain_name(dtype: str) -> str:
    """The method name of plain decoding in a dtype other than the target's, e.g. "plain-bfloat16"."""
    return f"{PLAIN}-{dtype}"

# (prompt ids, max new) -> ids, rounds, the pass's PassRecord (greedy plain decoding and our decoders) or None
Method = Callable[[list[int], int], tuple[list[int], list[RoundStat], Optional[PassRecord]]]


class BenchmarkError(RecipeError):
    """A malformed benchmark file: the one-line message names the file and the line (the CLI exits 2)."""


# --------------------------------------------------------------------------- benchmarks
@dataclass
class Benchmark:
    name: str
    path: Path
    prompts: list[list[str]]  # the user turns of each conversation


def resolve_benchmark(spec: str, data_root: str | Path) -> Path:
    """A bare name is <data-root>/eval/<name>.jsonl; anything that looks like a path is taken as given."""
    looks_like_path = "/" in spec or spec.endswith(".jsonl") or Path(spec).expanduser().exists()
    if looks_like_path:
        path = Path(spec).expanduser()
    else:
        path = Path.cwd() / Path(data_root).expanduser() / "eval" / f"{spec}.jsonl"
    if not path.is_file():
        known = ", ".join(BENCHMARKS)
        raise FileNotFoundError(f"benchmark {spec!r}: file not found: {path} (names: {known}, or a jsonl path)")
    return path


def load_benchmark(spec: str, data_root: str | Path, n: Optional[int] = None) -> Benchmark:
    """Read and validate every line (a bad line fails even past the first N), keep the first N prompts."""
    path = resolve_benchmark(spec, data_root)
    prompts = []
    try:
        for lineno, row in iter_jsonl(path):
            turns = row.get("turns") if isinstance(row, dict) else None
            if not (isinstance(turns, list) and turns and all(isinstance(turn, str) for turn in turns)):
                raise BenchmarkError(f"{path}: line {lineno}: expected {{\"turns\": [\"...\", ...]}} "
                                     f"(a non-empty list of strings), got {json.dumps(row)[:80]!r}")
            prompts.append(turns)
    except DataFileError as e:  # not UTF-8 or not JSON
        raise BenchmarkError(str(e)) from None
    if not prompts:
        raise BenchmarkError(f"{path}: no prompts")
    name = Path(spec).stem if path.name != f"{spec}.jsonl" else spec
    return Benchmark(name, path, prompts[:n] if n else prompts)


def fit_prompt(target, ids: list[int], cfg: EvalConfig, where: str) -> tuple[list[int], bool]:
    """`ids` if they fit the target's window with --max-new-tokens more; else their last tokens that do when
    --truncate-prompts asks (returns whether it cut), else PromptTooLong naming `where`, the counts and the fix."""
    try:
        target.check_fits(len(ids), cfg.max_new_tokens, where)
        return ids, False
    except PromptTooLong as e:
        keep = (target.context_window or 0) - cfg.max_new_tokens
        if not cfg.truncate_prompts or keep < 1:
            fix = ("lower --max-new-tokens" if keep < 1 else
                   "shorten it, lower --max-new-tokens or pass --truncate-prompts")
            raise PromptTooLong(f"{e}; {fix}") from None
        return ids[-keep:], True


def prompt_label(bench: Benchmark, i: int, turn: int) -> str:
    return f"{bench.path}: prompt {i + 1}" + (f" turn {turn + 1}" if turn else "")


# --------------------------------------------------------------------------- loading
def target_config(target: Optional[str], artifact: Path, dtype: Optional[str]) -> TargetConfig:
    """`--target` as a recipe file or a model id/path; absent: the artifact's (runrecord.target_of). `dtype` (when
    given) replaces the recipe's."""
    if target is not None and Path(target).suffix in (".yaml", ".yml"):
        cfg = load_recipe(target).target
    else:
        cfg = TargetConfig(model=target) if target is not None else target_of(artifact)
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def artifact_name(artifact: str, taken: Sequence[str]) -> str:
    """A short unique label: the directory name, with its parent when the name is generic or taken."""
    p = Path(artifact.rstrip("/"))
    name = p.name
    if name in taken or name in (ARTIFACT, FINAL, "export"):
        name = f"{p.parent.name}/{p.name}" if p.parent.name else name
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


# --------------------------------------------------------------------------- methods
def generation_kwargs(target, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> dict:
    """transformers `generate` arguments for plain decoding with the harness's sampling settings, stopping where
    `dspark data` stops (chat.stop_token_ids: the target's end of turn too), under the decoder's rules: the
    target's repetition penalty on, every generation_config rule the decoder cannot reproduce off
    (decoding/rules.py)."""
    tok = target.tokenizer
    gc = target.model.generation_config
    kw = dict(plain_overrides(gc), pad_token_id=tok.pad_token_id, eos_token_id=stop_token_ids(tok, gc))
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def hf_method(model, gen_kwargs: dict, record: bool = False, **extra) -> Method:
    """transformers' own `generate` (plain, prompt lookup or assisted): token ids after the prompt; `record`
    (greedy plain decoding): also its PassRecord, the reference of the lossless check."""
    def run(prompt: list[int], max_new_tokens: int):
        x = torch.tensor([prompt], device=model.device)
        kw = {**gen_kwargs, **extra, "max_new_tokens": max_new_tokens}
        if not record:
            return model.generate(x, attention_mask=torch.ones_like(x), **kw)[0, len(prompt):].tolist(), [], None
        rec = Recording()
        out = model.generate(x, attention_mask=torch.ones_like(x), logits_processor=LogitsProcessorList([rec]),
                             return_dict_in_generate=True, **kw)
        ids = out.sequences[0, len(prompt):].tolist()
        cache = out.cache
        return ids, [], PassRecord.build(rec.rows, cache, cache.get_seq_length(), len(ids))
    return run


def decoder_method(decoder: SpeculativeDecoder, cfg: EvalConfig, eos_token_id, hybrid: Optional[bool] = None
                   ) -> Method:
    """Our speculative decoder (dspark_train.decoding), its per-round trace turned into RoundStats (with the
    verified and accepted nodes per source when copy branches are on). `hybrid` overrides cfg.hybrid (the
    drafter-only baseline); a decoder without a drafter drafts by copying alone (the copy-only baseline)."""
    hybrid = cfg.hybrid if hybrid is None else hybrid
    mode = decoder.hybrid_base() if cfg.mode == "hybrid" or decoder.drafter is None else cfg.mode
    sampling = dict(mode=mode, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    eos_token_id=eos_token_id, hybrid=hybrid, record=cfg.temperature <= 0)

    def run(prompt: list[int], max_new_tokens: int):
        seed = int(torch.randint(0, 2**62, ()).item())  # from the harness's per-sample torch seed
        out = decoder.generate(prompt, max_new_tokens=max_new_tokens, seed=seed, **sampling)
        # RoundTrace.verified counts the draft nodes; the verify pass also computes the anchor
        return out.tokens, [RoundStat(r.verified + 1, r.n_accepted, max(r.depths, default=0),
                                      r.by_source() if hybrid else None, r.drafter_skipped,
                                      r.t_draft + r.t_verify + r.t_book) for r in out.rounds], out.record
    return run


@dataclass
class Measured:
    """All samples of one benchmark: samples[method][prompt][turn]."""

    benchmark: Benchmark
    samples: dict[str, list[list[Sample]]]
    prompts: list[list[list[int]]]  # rendered prompt ids [prompt][turn], as every method saw them
    truncated: int = 0  # prompt turns cut to the target's window (--truncate-prompts)


def _sync(device) -> None:
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(method: Method, prompt: list[int], max_new_tokens: int, seed: int, device) -> Sample:
    torch.manual_seed(seed)
    _sync(device)
    t0 = time.perf_counter()
    ids, rounds, record = method(prompt, max_new_tokens)
    _sync(device)
    return Sample(ids, time.perf_counter() - t0, rounds, record)


def measure(bench: Benchmark, target, methods: dict[str, Method], cfg: EvalConfig, drafters: Sequence[str],
            checked: Optional[dict[str, Checked]] = None) -> Measured:
    """Run every method on every prompt (turn), in an order rotated per prompt; later turns of a
    conversation see the plain target's previous answers, so every method gets the same prompt. After each
    turn (untimed) the `checked` methods' greedy passes are compared with plain decoding's bit for bit."""
    names = list(methods)
    samples = {m: [] for m in names}
    prompts, truncated = [], 0
    primary = drafters[0] if drafters else None
    bar = tqdm(bench.prompts, desc=bench.name, unit="prompt", disable=not cfg.progress, dynamic_ncols=True)
    for i, turns in enumerate(bar):
        order = names[i % len(names):] + names[:i % len(names)]
        for m in names:
            samples[m].append([])
        prompts.append([])
        history: list[dict] = []
        for turn, text in enumerate(turns if cfg.multi_turn else turns[:1]):
            history += user_messages([text])
            ids, cut = fit_prompt(target, prompt_ids(target.tokenizer, history), cfg, prompt_label(bench, i, turn))
            truncated += cut
            prompts[-1].append(ids)
            for m in order:
                samples[m][-1].append(_timed(methods[m], ids, cfg.max_new_tokens, cfg.seed + 1000 * i + turn,
                                             target.device))
            for m, how in (checked or {}).items():
                judge(samples[PLAIN][-1][-1], samples[m][-1][-1], ids, cfg.max_new_tokens, how,
                      {"prompt": i, "turn": turn})
            for m in names:
                samples[m][-1][-1].record = None
            answer = target.tokenizer.decode(samples[PLAIN][-1][-1].ids, skip_special_tokens=True)
            history.append({"role": "assistant", "content": answer})
        if primary:
            running = method_metrics(samples[PLAIN], samples[primary], greedy=False)
            bar.set_postfix(tau=f"{running['tau'] or 0:.2f}", speedup=f"{running['speedup'] or 0:.2f}x")
    return Measured(bench, samples, prompts, truncated)


def benchmark_report(m: Measured, target, drafter: str, baselines: Sequence[str], greedy: bool) -> dict:
    """The §7 entry of one benchmark for one drafter, with the lossless verdict from the bit-level checks
    (evaluation/lossless.py), the shared baselines and the speedups against the fastest plain decoding measured
    (any dtype)."""
    plain = m.samples[PLAIN]
    entry = method_metrics(plain, m.samples[drafter], greedy)
    if greedy:
        verdict(entry, checks_of(m.samples[drafter]))
    dtype = str(target.dtype).removeprefix("torch.")
    fastest = fastest_plain({dtype: plain, **{d: m.samples[plain_name(d)] for d in AUTO_DTYPES
                                              if d != dtype and plain_name(d) in m.samples}})
    entry.update(fastest)
    entry["speedup_vs_fastest_plain"] = speedup_over(entry["tokens_per_s"], fastest)
    entry["baselines"] = {}
    for b in baselines:
        ours = b in DECODER_BASELINES  # our own decoders also report τ and where accepted tokens came from
        r = method_metrics(plain, m.samples[b], greedy, drafter=ours)
        if ours and greedy:
            verdict(r, checks_of(m.samples[b]))
        keys = ("tokens_per_s", "speedup", "agreement", "lossless") + (("tau", "sources", "lossless_evidence")
                                                                      if ours else ())
        entry["baselines"][b] = {k: r.get(k) for k in keys}
        entry["baselines"][b]["speedup_vs_fastest_plain"] = speedup_over(r["tokens_per_s"], fastest)
    entry["file"] = str(m.benchmark.path)
    entry["truncated_prompts"] = m.truncated
    return entry


@holds_lock(lambda cfg: cfg.out, "dspark eval")
def run_eval(cfg: EvalConfig) -> dict:
    """`dspark eval`: load, warm up, measure every benchmark side by side, write the report and plots."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    benches = [load_benchmark(spec, cfg.data_root, cfg.n) for spec in cfg.benchmarks]
    baselines = [b for b in cfg.baselines if (b != "assisted" or cfg.assistant)  # assisted needs --assistant
                 and (b not in DECODER_BASELINES or cfg.hybrid)]  # these compare against copy branches
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    tcfg = target_config(cfg.target, resolve_artifact(cfg.artifact), cfg.dtype)
    target = load_target(tcfg, device.type)
    target.model.to(device)
    print(f"{detect(device.type).describe()}; target dtype {target.precision}", flush=True)
    for b in benches:  # every first turn fits (or may be cut) before anything is measured; later turns: measure
        for i, turns in enumerate(b.prompts):
            fit_prompt(target, prompt_ids(target.tokenizer, user_messages(turns[:1])), cfg, prompt_label(b, i, 0))
    greedy = cfg.temperature <= 0
    gen = generation_kwargs(target, cfg.temperature, cfg.top_p, cfg.top_k)
    methods: dict[str, Method] = {PLAIN: hf_method(target.model, gen, record=greedy)}
    if cfg.fastest_plain:  # plain decoding in the other precision: the fastest plain decoding this machine offers
        for dtype in AUTO_DTYPES:
            if dtype != target.precision.value:
                other = load_target(replace(tcfg, dtype=dtype), device.type).model.to(device)
                methods[plain_name(dtype)] = hf_method(other, gen)
    drafters: dict[str, dict] = {}
    ours: dict[str, tuple[SpeculativeDecoder, Optional[bool]]] = {}  # our decoders: (decoder, hybrid override)
    for spec in [cfg.artifact, *cfg.compare]:
        name = artifact_name(spec, [*methods, *BASELINES, *drafters])
        drafter = load_artifact(spec, target=target)  # checks the fingerprint, attaches the target
        if cfg.mode == "adaptive" and drafter.calibration is None:
            raise RecipeError(f"{spec}: --mode adaptive needs {CALIBRATION} (run `dspark calibrate` first)")
        decoder = SpeculativeDecoder(target, drafter, calibration=drafter.calibration)
        drafters[name] = {"drafter": spec, "calibration": drafter.calibration,
                          **{k: getattr(drafter.config, k) for k in ("kind", "head", "block_size")}}
        if (cfg.mode if cfg.mode != "hybrid" else decoder.hybrid_base()) == "adaptive":
            # resolved before timing: a policy tuned on another machine is re-tuned here
            decoder.adaptive_policy()
            drafters[name]["adaptive_policy"] = decoder.adaptive_info
            print(f"{name}: adaptive policy from {decoder.adaptive_info['source']} "
                  f"({decoder.adaptive_info['why']})", flush=True)
        ours[name] = (decoder, None)
        if len(drafters) == 1 and "drafter-only" in baselines:
            ours["drafter-only"] = (decoder, False)
        if len(drafters) == 1 and "copy-only" in baselines:  # the drafter's calibration: copy prior, cost curve
            ours["copy-only"] = (SpeculativeDecoder(target, None, calibration=drafter.calibration), True)
    primary = ours[next(iter(drafters))][0]
    exact = exact_attention_choice(cfg.exact_attention, greedy, target,
                                   1 + max(1, primary.policy(cfg.mode).node_budget))
    print(f"exact attention: {exact['layers']} of {exact['of']} layers ({exact['reason']})", flush=True)
    checked: dict[str, Checked] = {}
    for name, (decoder, hybrid) in ours.items():
        timed = decoder.with_exact_attention(exact["layers"], exact["projections"])
        methods[name] = decoder_method(timed, cfg, gen["eos_token_id"], hybrid)
        if greedy:  # what can be compared bit for bit here (attention.measure_row_exact measured it)
            every = exact["row_exact_here"] and exact["layers"] >= exact["of"]
            replay = decoder_method(decoder.with_exact_attention(True), cfg, gen["eos_token_id"], hybrid) \
                if exact["row_exact_here"] and not every else None
            layers = exact["of"] if every else exact["check_layers"] if exact["layers"] == 1 else 0
            checked[name] = Checked(layers, every, replay, target.precision.value == "float32")
    if "prompt-lookup" in baselines:
        methods["prompt-lookup"] = hf_method(target.model, gen, prompt_lookup_num_tokens=cfg.prompt_lookup_tokens)
    if "assisted" in baselines:
        assistant = load_target(TargetConfig(model=cfg.assistant, dtype=target.precision.value), device.type)
        if assistant.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise RecipeError(f"--assistant {cfg.assistant}: its tokenizer differs from the target's")
        methods["assisted"] = hf_method(target.model, gen, assistant_model=assistant.model.to(device))

    warm, _ = fit_prompt(target, prompt_ids(target.tokenizer, user_messages(benches[0].prompts[0][:1])), cfg, "")
    for method in methods.values():  # allocator, kernels, caches: excluded from every metric
        _timed(method, warm, min(16, cfg.max_new_tokens), cfg.seed, device)

    measured = [measure(b, target, methods, cfg, list(drafters), checked) for b in benches]
    cut = sum(m.truncated for m in measured)
    if cut:
        print(f"truncated {cut} prompt{'s' if cut > 1 else ''} to the last {target.context_window - cfg.max_new_tokens}"
              f" tokens (the target's window of {target.context_window} minus --max-new-tokens)")
    report = build_report(measured, target, drafters, baselines, cfg, exact)
    out = Path(cfg.out)
    write_report(report, out, drafters[next(iter(drafters))]["calibration"])
    if cfg.save_outputs:
        write_outputs(measured, target.tokenizer, out / OUTPUTS)
    print(render_markdown(report))
    print(f"report written to {out / REPORT_JSON}, {REPORT_MD} and plots")
    errors = lossless_errors(report)
    if errors:
        raise LosslessError(f"greedy speculative decoding is not shown lossless at {len(errors)} place(s): "
                            + "; ".join(errors[:5]) + (" …" if len(errors) > 5 else "")
                            + f" (details in {out / REPORT_MD})")
    return report


def build_report(measured: Sequence[Measured], target, drafters: dict[str, dict], baselines: Sequence[str],
                 cfg: EvalConfig, exact: Optional[dict] = None) -> dict:
    """The §7 report of a finished measurement (report.assemble): per benchmark and drafter the metrics
    against plain decoding, with the target's top-2 logit gap at every divergence; the settings; the machine
    (hardware.py: CPU model and the flags that matter, or the GPU) and the dtype choice with its reason."""
    greedy = cfg.temperature <= 0
    per_drafter = {name: {m.benchmark.name: benchmark_report(m, target, name, baselines, greedy) for m in measured}
                   for name in drafters}
    add_tuner_checks(per_drafter, measured, drafters, cfg.hybrid and "drafter-only" in baselines)
    caps = detect(target.device.type)
    environment = {"target": target.name, "device": target.device.type, "device_name": caps.name,
                   "machine": caps.to_dict(), "dtype": target.precision.value,
                   "dtype_choice": target.precision.to_dict(), "threads": torch.get_num_threads(),
                   "versions": _versions(), "exact_attention": exact,
                   "generation_rules": generation_rules(target.model.generation_config)}
    return assemble(per_drafter, drafters, cfg, environment)


def _versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__}
