"""Eval harness: τ, per-position acceptance and wall-clock speedup of drafters against plain decoding.

Every method (plain target ``generate``, each drafter's speculative decoder, transformers' prompt-lookup and
assisted generation) runs on the same prompt back to back, in an order rotated per prompt, so machine drift
cancels instead of biasing one method. The report schema is METHOD.md §7 (binding: other tools read it).

This module is imported when the ``dspark`` parser is built, so torch and transformers are imported inside
functions only.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import REPO_ROOT, DataConfig, RecipeError, TargetConfig

BENCHMARKS = ("gsm8k", "mt-bench", "humaneval", "mbpp")
BASELINES = ("prompt-lookup", "assisted", "drafter-only", "copy-only")
# [J] hybrid: drafter-only = the same decoder without copy branches, copy-only = our copy drafter without the
# learned drafter; both apply only to hybrid runs (--mode hybrid or --hybrid)
DECODER_BASELINES = ("drafter-only", "copy-only")
PLAIN = "plain"


class BenchmarkError(RecipeError):
    """A malformed benchmark file: the one-line message names the file and the line (the CLI exits 2)."""


# --------------------------------------------------------------------------- arguments
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="drafter artifact directory or Hub id")
    p.add_argument("--target", default=None,
                   help="target model id/path or recipe YAML (default: the artifact's recipe.yaml, else the "
                        "model id in its target fingerprint)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                   help="comma-separated names (<data-root>/eval/<name>.jsonl) or jsonl paths of {\"turns\": [...]}")
    p.add_argument("--n", type=int, default=50, help="prompts per benchmark (the first N; 0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--mode", choices=("chain", "tree", "adaptive", "hybrid"), default="chain",
                   help="hybrid = adaptive (tree without calibration) + copy branches")  # [J] hybrid
    p.add_argument("--hybrid", action="store_true",
                   help="merge copy-drafter branches (prompt + output so far) into the mode's trees")  # [J] hybrid
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each prompt and method reseeds)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="target dtype (default: the target recipe's, bfloat16 for a bare model id)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default="runs/eval", help="output directory (report.json, report.md, plots)")
    p.add_argument("--multi-turn", action="store_true",
                   help="all turns; later turns see the target's own previous answers")
    p.add_argument("--save-outputs", action="store_true", help="write every generation to outputs.jsonl")
    p.add_argument("--compare", nargs="+", default=[], metavar="ARTIFACT",
                   help="more drafter artifacts measured in the same run (one report, one plot)")
    p.add_argument("--baselines", default="prompt-lookup,assisted,drafter-only",
                   help="prompt-lookup, assisted (needs --assistant), drafter-only and copy-only (hybrid runs "
                        "only); '' for none")
    p.add_argument("--prompt-lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens")
    p.add_argument("--assistant", default=None, help="small model with the same tokenizer for assisted generation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-root", default=DataConfig.root, help="data root (relative to the repo root)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


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
        root = Path(data_root).expanduser()
        path = (root if root.is_absolute() else REPO_ROOT / root) / "eval" / f"{spec}.jsonl"
    if not path.is_file():
        known = ", ".join(BENCHMARKS)
        raise FileNotFoundError(f"benchmark {spec!r}: file not found: {path} (names: {known}, or a jsonl path)")
    return path


def load_benchmark(spec: str, data_root: str | Path, n: Optional[int] = None) -> Benchmark:
    """Read and validate every line (a bad line fails even past the first N), keep the first N prompts."""
    path = resolve_benchmark(spec, data_root)
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise BenchmarkError(f"{path}: line {lineno}: expected {{\"turns\": [\"...\", ...]}} "
                                 f"(a non-empty list of strings), got {line[:80]!r}")
        prompts.append(turns)
    if not prompts:
        raise BenchmarkError(f"{path}: no prompts")
    name = Path(spec).stem if path.name != f"{spec}.jsonl" else spec
    return Benchmark(name, path, prompts[:n] if n else prompts)


# --------------------------------------------------------------------------- measurements
@dataclass
class RoundStat:
    """One draft-verify round of a speculative decoder."""

    verified: int  # tokens in the target's verify pass: the anchor plus every drafted node
    accepted: int  # drafted tokens accepted (the bonus/correction token excluded)
    depth: int  # draft positions that were verified (chain: drafted length; tree: deepest level)
    # [J] hybrid: {source: [verified nodes, accepted nodes]} for drafter / copy / both; drafter forward skipped
    sources: Optional[dict] = None
    skipped: bool = False


@dataclass
class Sample:
    """One timed generation of one method on one prompt turn."""

    ids: list[int]
    seconds: float
    rounds: list[RoundStat] = field(default_factory=list)


Method = Callable[[list[int], int], tuple[list[int], list[RoundStat]]]  # (prompt ids, max new) -> ids, rounds


def acceptance_metrics(rounds: Sequence[RoundStat]) -> dict:
    """τ (bonus included), prefix survival and conditional acceptance by position, verify rate.

    Position k's denominators count only rounds that verified position k, so adaptive depths are not
    read as rejections. Survival: accepted ≥ k. Conditional: accepted ≥ k given accepted ≥ k−1.
    """
    if not rounds:
        return {"tau": None, "accept_rate_by_position": [], "conditional_accept_by_position": [],
                "verify_rate": None, "rounds": 0}
    depth = max(r.depth for r in rounds)
    survival, conditional = [], []
    for k in range(1, depth + 1):
        reached = [r for r in rounds if r.depth >= k]
        survived = sum(r.accepted >= k for r in reached)
        survival.append(survived / len(reached))
        alive = sum(r.accepted >= k - 1 for r in reached)
        conditional.append(survived / alive if alive else None)
    committed = sum(r.accepted + 1 for r in rounds)
    out = {"tau": committed / len(rounds), "accept_rate_by_position": survival,
           "conditional_accept_by_position": conditional,
           "verify_rate": committed / sum(r.verified for r in rounds), "rounds": len(rounds)}
    if any(r.sources is not None for r in rounds):  # [J] hybrid
        out.update(source_metrics(rounds))
    return out


def source_metrics(rounds: Sequence[RoundStat]) -> dict:
    """[J] hybrid: per source (drafter, copy, both = a node both proposed) verified and accepted draft nodes,
    acceptance = accepted / verified, and the share of all accepted draft tokens; rounds that skipped the
    drafter's forward."""
    totals = {s: [0, 0] for s in ("drafter", "copy", "both")}
    for r in rounds:
        for s, (v, a) in (r.sources or {}).items():
            totals[s][0] += v
            totals[s][1] += a
    accepted = sum(a for _, a in totals.values())
    return {"sources": {s: {"verified": v, "accepted": a, "acceptance": a / v if v else None,
                            "share_of_accepted": a / accepted if accepted else None} for s, (v, a) in totals.items()},
            "drafter_skipped_rounds": sum(r.skipped for r in rounds) / len(rounds)}


def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first differing token (a length difference counts), None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _throughput(samples: Sequence[Sample]) -> tuple[int, float, float]:
    tokens = sum(len(s.ids) for s in samples)
    seconds = sum(s.seconds for s in samples)
    return tokens, seconds, tokens / seconds if seconds > 0 else 0.0


def method_metrics(plain: list[list[Sample]], ours: list[list[Sample]], greedy: bool, drafter: bool = True) -> dict:
    """Metrics of one method against plain decoding on one benchmark; samples are [prompt][turn].

    `drafter`: add acceptance statistics and the divergences (prompt, turn, position, tokens; the caller adds
    the target's top-2 logit gap). A prompt agrees when all its turns are identical."""
    flat_plain = [s for turns in plain for s in turns]
    flat_ours = [s for turns in ours for s in turns]
    tokens, seconds, tps = _throughput(flat_ours)
    base_tokens, base_seconds, base_tps = _throughput(flat_plain)
    same = [all(p.ids == o.ids for p, o in zip(pt, ot)) for pt, ot in zip(plain, ours)]
    out = {"n_prompts": len(plain), "n_generations": len(flat_ours)}
    if drafter:
        out.update(acceptance_metrics([r for s in flat_ours for r in s.rounds]))
    out.update({
        "tokens_per_s": tps, "baseline_tokens_per_s": base_tps,
        "speedup": tps / base_tps if base_tps > 0 else None,
        "lossless": all(same) if greedy else None,
        "agreement": sum(same) / len(same),
        "generated_tokens": tokens, "seconds": seconds,
        "baseline_generated_tokens": base_tokens, "baseline_seconds": base_seconds,
    })
    if drafter:  # sampled outputs differ by design: no divergence analysis
        out["divergences"] = None if not greedy else [
            {"prompt": i, "turn": t, "position": pos, "plain_token": _at(p.ids, pos), "drafter_token": _at(o.ids, pos)}
            for i, (pt, ot) in enumerate(zip(plain, ours)) for t, (p, o) in enumerate(zip(pt, ot))
            if (pos := first_divergence(p.ids, o.ids)) is not None]
    return out


def _at(ids: Sequence[int], i: int) -> Optional[int]:
    return ids[i] if i < len(ids) else None


# --------------------------------------------------------------------------- loading
def target_config(target: Optional[str], artifact: Path, dtype: Optional[str]) -> TargetConfig:
    """`--target` as a recipe file or a model id/path; absent: the artifact's recipe, else its fingerprint."""
    from .config import load_recipe

    if target is not None and Path(target).suffix in (".yaml", ".yml"):
        cfg = load_recipe(target).target
    elif target is not None:
        cfg = TargetConfig(model=target)
    elif (artifact / "recipe.yaml").is_file():  # only its target matters: other machines' paths must not fail
        cfg = load_recipe(artifact / "recipe.yaml", ["distributed.accelerate_config=null",
                                                      "target.config_path=null"]).target
    else:
        conf = artifact / "config.json"
        if not conf.is_file():
            raise FileNotFoundError(f"artifact {artifact}: config.json not found")
        fp = json.loads(conf.read_text()).get("target_fingerprint") or {}
        if not fp.get("model_id") or fp["model_id"].startswith("inline:"):
            raise RecipeError(f"{conf}: target_fingerprint names no loadable model; pass --target")
        cfg = TargetConfig(model=fp["model_id"], revision=fp.get("revision"))
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def artifact_name(artifact: str, taken: Sequence[str]) -> str:
    """A short unique label: the directory name, with its parent when the name is generic or taken."""
    p = Path(artifact.rstrip("/"))
    name = p.name
    if name in taken or name in ("artifact", "final", "export"):
        name = f"{p.parent.name}/{p.name}" if p.parent.name else name
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


# --------------------------------------------------------------------------- methods
def _gen_kwargs(target, args) -> dict:
    tok = target.tokenizer
    kw = dict(pad_token_id=tok.pad_token_id,
              eos_token_id=target.model.generation_config.eos_token_id or tok.eos_token_id)
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def hf_method(model, gen_kwargs: dict, **extra) -> Method:
    """transformers' own `generate` (plain, prompt lookup or assisted): token ids after the prompt."""
    import torch

    def run(prompt: list[int], max_new_tokens: int):
        x = torch.tensor([prompt], device=model.device)
        out = model.generate(x, attention_mask=torch.ones_like(x), **{**gen_kwargs, **extra},
                             max_new_tokens=max_new_tokens)
        return out[0, len(prompt):].tolist(), []
    return run


def decoder_method(target, drafter, args, eos_token_id, hybrid: Optional[bool] = None,
                   calibration: Optional[dict] = None) -> Method:
    """Our speculative decoder (dspark_train.decoding), its per-round trace turned into RoundStats.
    [J] hybrid: `hybrid` overrides --mode hybrid / --hybrid (the drafter-only and copy-only baselines);
    drafter None = copy drafting alone (then `calibration` supplies the copy prior and cost profile)."""
    import torch

    from .decoding import SpeculativeDecoder

    decoder = SpeculativeDecoder(target, drafter, calibration=drafter.calibration if drafter else calibration)
    if hybrid is None:
        hybrid = args.mode == "hybrid" or args.hybrid
    mode = ("adaptive" if "adaptive" in decoder.policies else "tree") if args.mode == "hybrid" else args.mode
    sampling = dict(mode=mode, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    eos_token_id=eos_token_id, hybrid=hybrid)

    def run(prompt: list[int], max_new_tokens: int):
        seed = int(torch.randint(0, 2**62, ()).item())  # from the harness's per-sample torch seed
        out = decoder.generate(prompt, max_new_tokens=max_new_tokens, seed=seed, **sampling)
        # RoundTrace.verified counts the draft nodes; the verify pass also computes the anchor
        return out.tokens, [RoundStat(r.verified + 1, r.n_accepted, max(r.depths, default=0),
                                      _by_source(r) if hybrid else None, r.drafter_skipped) for r in out.rounds]
    return run


def _by_source(r) -> dict:
    """[J] hybrid: {source: [verified, accepted]} of one RoundTrace."""
    out = {}
    for s, ok in zip(r.sources, r.accepted):
        e = out.setdefault(s, [0, 0])
        e[0] += 1
        e[1] += ok
    return out


def top2_gap(target, context: list[int]) -> float:
    """The target's top-1 minus top-2 logit for the token after `context` (full forward, eval dtype)."""
    import torch

    with torch.no_grad():
        x = torch.tensor([context], device=target.device)
        logits = target.model(input_ids=x).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


# --------------------------------------------------------------------------- the run
@dataclass
class Measured:
    """All samples of one benchmark: samples[method][prompt][turn]."""

    benchmark: Benchmark
    samples: dict[str, list[list[Sample]]]
    prompts: list[list[list[int]]]  # rendered prompt ids [prompt][turn]


def _sync(device) -> None:
    import torch
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(method: Method, prompt: list[int], max_new_tokens: int, seed: int, device) -> Sample:
    import torch

    torch.manual_seed(seed)
    _sync(device)
    t0 = time.perf_counter()
    ids, rounds = method(prompt, max_new_tokens)
    _sync(device)
    return Sample(ids, time.perf_counter() - t0, rounds)


def measure(bench: Benchmark, target, methods: dict[str, Method], args, drafters: Sequence[str]) -> Measured:
    """Run every method on every prompt (turn), in an order rotated per prompt; later turns of a
    conversation see the plain target's previous answers, so every method gets the same prompt."""
    from tqdm import tqdm

    from .chat import prompt_ids, user_messages

    names = list(methods)
    samples = {m: [] for m in names}
    prompts = []
    primary = drafters[0] if drafters else None
    bar = tqdm(bench.prompts, desc=bench.name, unit="prompt", disable=args.no_progress, dynamic_ncols=True)
    for i, turns in enumerate(bar):
        order = names[i % len(names):] + names[:i % len(names)]
        for m in names:
            samples[m].append([])
        prompts.append([])
        history: list[dict] = []
        for t, text in enumerate(turns if args.multi_turn else turns[:1]):
            history += user_messages([text])
            ids = prompt_ids(target.tokenizer, history)
            prompts[-1].append(ids)
            for m in order:
                samples[m][-1].append(_timed(methods[m], ids, args.max_new_tokens, args.seed + 1000 * i + t,
                                             target.device))
            answer = target.tokenizer.decode(samples[PLAIN][-1][-1].ids, skip_special_tokens=True)
            history.append({"role": "assistant", "content": answer})
        if primary:
            running = method_metrics(samples[PLAIN], samples[primary], greedy=False)
            bar.set_postfix(tau=f"{running['tau'] or 0:.2f}", speedup=f"{running['speedup'] or 0:.2f}x")
    return Measured(bench, samples, prompts)


def benchmark_report(m: Measured, target, drafter: str, baselines: Sequence[str], greedy: bool) -> dict:
    """The §7 entry of one benchmark for one drafter, with divergence gaps and the shared baselines."""
    plain = m.samples[PLAIN]
    entry = method_metrics(plain, m.samples[drafter], greedy)
    for d in entry["divergences"] or []:
        context = m.prompts[d["prompt"]][d["turn"]] + plain[d["prompt"]][d["turn"]].ids[:d["position"]]
        d["top2_logit_gap"] = top2_gap(target, context)
    entry["baselines"] = {}
    for b in baselines:
        ours = b in DECODER_BASELINES  # [J] hybrid: our own decoders also report τ and where tokens came from
        r = method_metrics(plain, m.samples[b], greedy, drafter=ours)
        keys = ("tokens_per_s", "speedup", "agreement", "lossless") + (("tau", "sources") if ours else ())
        entry["baselines"][b] = {k: r.get(k) for k in keys}
    entry["file"] = str(m.benchmark.path)
    return entry


def run_eval(args) -> dict:
    """`dspark eval`: load, warm up, measure every benchmark side by side, write the report and plots."""
    import torch

    from .chat import prompt_ids, user_messages
    from .target import load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    benches = [load_benchmark(s.strip(), args.data_root, args.n) for s in args.benchmarks.split(",") if s.strip()]
    if not benches:
        raise BenchmarkError("--benchmarks: no benchmark given")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise RecipeError(f"--baselines: unknown {sorted(unknown)} (known: {', '.join(BASELINES)})")
    if "assisted" in baselines and not args.assistant:
        baselines.remove("assisted")
    if args.mode != "hybrid" and not args.hybrid:  # [J] hybrid: these compare against the hybrid decoder
        baselines = [b for b in baselines if b not in DECODER_BASELINES]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    from .export import load_artifact, resolve_artifact

    target = load_target(target_config(args.target, resolve_artifact(args.artifact), args.dtype))
    target.model.to(device)
    gen = _gen_kwargs(target, args)
    methods: dict[str, Method] = {PLAIN: hf_method(target.model, gen)}
    drafters: dict[str, dict] = {}
    for spec in [args.artifact, *args.compare]:
        name = artifact_name(spec, [PLAIN, *BASELINES, *drafters])
        drafter = load_artifact(spec, target=target)  # checks the fingerprint, attaches the target
        if args.mode == "adaptive" and drafter.calibration is None:
            raise RecipeError(f"{spec}: --mode adaptive needs calibration.json (run `dspark calibrate` first)")
        drafters[name] = {"drafter": spec, "calibration": drafter.calibration,
                          **{k: getattr(drafter.config, k) for k in ("kind", "head", "block_size")}}
        methods[name] = decoder_method(target, drafter, args, gen["eos_token_id"])
        if len(drafters) == 1 and "drafter-only" in baselines:  # [J] hybrid
            methods["drafter-only"] = decoder_method(target, drafter, args, gen["eos_token_id"], hybrid=False)
        if len(drafters) == 1 and "copy-only" in baselines:  # [J] hybrid
            methods["copy-only"] = decoder_method(target, None, args, gen["eos_token_id"], hybrid=True,
                                                  calibration=drafter.calibration)
    if "prompt-lookup" in baselines:
        methods["prompt-lookup"] = hf_method(target.model, gen, prompt_lookup_num_tokens=args.prompt_lookup_tokens)
    if "assisted" in baselines:
        dtype = str(target.dtype).removeprefix("torch.")
        assistant = load_target(TargetConfig(model=args.assistant, dtype=dtype))
        if assistant.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise RecipeError(f"--assistant {args.assistant}: its tokenizer differs from the target's")
        methods["assisted"] = hf_method(target.model, gen, assistant_model=assistant.model.to(device))

    warm = prompt_ids(target.tokenizer, user_messages(benches[0].prompts[0][:1]))
    for method in methods.values():  # allocator, kernels, caches: excluded from every metric
        _timed(method, warm, min(16, args.max_new_tokens), args.seed, device)

    measured = [measure(b, target, methods, args, list(drafters)) for b in benches]
    report = build_report(measured, target, drafters, baselines, args)
    out = Path(args.out)
    write_report(report, out, drafters[next(iter(drafters))]["calibration"])
    if args.save_outputs:
        write_outputs(measured, target.tokenizer, out / "outputs.jsonl")
    print(render_markdown(report))
    print(f"report written to {out}/report.json, report.md and plots")
    return report


def build_report(measured: Sequence[Measured], target, drafters: dict[str, dict], baselines: Sequence[str],
                 args) -> dict:
    """The §7 report: the first drafter's fields at the top level, every drafter under `drafters`."""
    import torch

    greedy = args.temperature <= 0
    per_drafter = {name: {m.benchmark.name: benchmark_report(m, target, name, baselines, greedy) for m in measured}
                   for name in drafters}
    primary = next(iter(drafters))
    return {
        "target": target.name, "drafter": drafters[primary]["drafter"], "device": target.device.type,
        "device_name": _device_name(target.device), "dtype": str(target.dtype).removeprefix("torch."),
        "temperature": args.temperature, "mode": args.mode, "hybrid": args.mode == "hybrid" or args.hybrid,
        "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
        "multi_turn": args.multi_turn, "threads": torch.get_num_threads(),
        "benchmarks": per_drafter[primary],
        "drafters": {name: {**{k: v for k, v in d.items() if k != "calibration"},
                            "calibration": _calibration_summary(d.get("calibration")),
                            "benchmarks": per_drafter[name]} for name, d in drafters.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }


def _device_name(device) -> str:
    import platform

    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _versions() -> dict:
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _calibration_summary(cal: Optional[dict]) -> Optional[dict]:
    if cal is None:
        return None
    keys = ("temperatures", "biases", "ece_before", "ece_after", "auroc_before", "auroc_after", "adaptive")
    return {k: cal[k] for k in keys if k in cal}


def write_outputs(measured: Sequence[Measured], tok, path: Path) -> None:
    """One line per benchmark prompt turn: the prompt and every method's ids, text and seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for m in measured:
            for i, turns in enumerate(m.prompts):
                for t, prompt in enumerate(turns):
                    row = {"benchmark": m.benchmark.name, "prompt": i, "turn": t,
                           "prompt_text": tok.decode(prompt),
                           "outputs": {name: {"ids": s[i][t].ids, "text": tok.decode(s[i][t].ids),
                                              "seconds": s[i][t].seconds} for name, s in m.samples.items()}}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- report files
def _fmt(x, spec=".2f", none="—") -> str:
    return none if x is None else format(x, spec)


def render_markdown(report: dict) -> str:
    """report.md: settings, one table per drafter, acceptance by position, divergences, comparison."""
    turns = "all turns" if report["multi_turn"] else "first turn"
    lines = [f"# Speculative decoding eval: {report['drafter']} on {report['target']}", "",
             f"device {report['device']} ({report['device_name']}, {report['threads']} threads) · dtype "
             f"{report['dtype']} · temperature {report['temperature']} · mode {report['mode']}"
             f"{' + copy branches' if report.get('hybrid') and report['mode'] != 'hybrid' else ''} · "
             f"max_new_tokens {report['max_new_tokens']} · {turns}", ""]
    for name, d in report["drafters"].items():
        baselines = sorted({b for e in d["benchmarks"].values() for b in e["baselines"]})
        lines += [f"## {name}", "",
                  "| benchmark | prompts | τ | verify rate | tok/s | plain tok/s | speedup | lossless | agreement | "
                  + " | ".join(f"{b} tok/s (×)" for b in baselines) + " |",
                  "|" + "---|" * (9 + len(baselines))]
        for bname, e in d["benchmarks"].items():
            lossless = {True: "yes", False: "**no**", None: "n/a (sampling)"}[e["lossless"]]
            cells = [bname, str(e["n_prompts"]), _fmt(e["tau"]), _fmt(e["verify_rate"]), _fmt(e["tokens_per_s"], ".1f"),
                     _fmt(e["baseline_tokens_per_s"], ".1f"), _fmt(e["speedup"], ".2f") + "×", lossless,
                     _fmt(e["agreement"], ".0%")]
            cells += [f"{_fmt(e['baselines'][b]['tokens_per_s'], '.1f')} ({_fmt(e['baselines'][b]['speedup'])}×"
                      + (f", τ {_fmt(e['baselines'][b]['tau'])}" if e["baselines"][b].get("tau") else "") + ")"
                      if b in e["baselines"] else "—" for b in baselines]
            lines.append("| " + " | ".join(cells) + " |")
        depth = max((len(e["accept_rate_by_position"]) for e in d["benchmarks"].values()), default=0)
        if depth:
            lines += ["", "Acceptance by position (prefix survival / conditional):", "",
                      "| benchmark | " + " | ".join(str(k) for k in range(1, depth + 1)) + " |",
                      "|" + "---|" * (depth + 1)]
            for bname, e in d["benchmarks"].items():
                pairs = list(zip(e["accept_rate_by_position"], e["conditional_accept_by_position"]))
                cells = [f"{_fmt(s)} / {_fmt(c)}" for s, c in pairs] + ["—"] * (depth - len(pairs))
                lines.append(f"| {bname} | " + " | ".join(cells) + " |")
        lines += _source_table(d["benchmarks"])  # [J] hybrid
        divs = [(b, x) for b, e in d["benchmarks"].items() for x in e["divergences"] or []]
        if divs:
            lines += ["", f"Divergences from plain greedy ({len(divs)}): first differing position and the target's "
                      "top-2 logit gap there (near-ties are expected in bf16, not in fp32):", ""]
            lines += [f"- {b} prompt {x['prompt']} turn {x['turn']}: position {x['position']}, gap "
                      f"{_fmt(x['top2_logit_gap'], '.4f')}" for b, x in divs]
        cal = d.get("calibration")
        if cal and cal.get("ece_before"):
            pairs = ", ".join(f"{_fmt(b, '.1%')} → {_fmt(a, '.1%')}" for b, a in zip(cal["ece_before"], cal["ece_after"]))
            lines += ["", f"Confidence calibration (ECE by position, before → after STS): {pairs}"]
        lines.append("")
    if len(report["drafters"]) > 1:
        names = list(report["drafters"])
        lines += ["## Comparison (τ / speedup)", "", "| benchmark | " + " | ".join(names) + " |",
                  "|" + "---|" * (len(names) + 1)]
        for bname in report["benchmarks"]:
            cells = [f"{_fmt(report['drafters'][n]['benchmarks'][bname]['tau'])} / "
                     f"{_fmt(report['drafters'][n]['benchmarks'][bname]['speedup'])}×" for n in names]
            lines.append(f"| {bname} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _source_table(benchmarks: dict) -> list[str]:
    """[J] hybrid: where accepted draft tokens came from, and each source's acceptance (accepted / verified
    nodes); `both` = nodes the drafter and the copy drafter proposed alike."""
    rows = [(b, e["sources"], e["drafter_skipped_rounds"]) for b, e in benchmarks.items() if e.get("sources")]
    if not rows:
        return []

    def cell(x):
        return f"{_fmt(x['share_of_accepted'], '.0%')} ({x['accepted']}/{x['verified']} = {_fmt(x['acceptance'])})"
    lines = ["", "Accepted draft tokens by source: share of all accepted (accepted / verified nodes = acceptance):", "",
             "| benchmark | drafter | copy | both | rounds without a drafter forward |", "|---|---|---|---|---|"]
    lines += [f"| {b} | {cell(src['drafter'])} | {cell(src['copy'])} | {cell(src['both'])} | {_fmt(skip, '.0%')} |"
              for b, src, skip in rows]
    return lines


def write_report(report: dict, out: Path, calibration: Optional[dict]) -> list[Path]:
    """report.json, report.md and the PNG plots; returns the plot paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return plot_report(report, out, calibration)


def plot_report(report: dict, out: Path, calibration: Optional[dict]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    benches = list(report["benchmarks"])
    drafters = report["drafters"]

    fig, axes = plt.subplots(1, len(benches), figsize=(4 * len(benches), 3.4), squeeze=False, sharey=True)
    for ax, b in zip(axes[0], benches):
        for i, (name, d) in enumerate(drafters.items()):
            e = d["benchmarks"][b]
            ks = range(1, len(e["accept_rate_by_position"]) + 1)
            color = f"C{i}"
            ax.plot(ks, e["accept_rate_by_position"], "o-", color=color, label=f"{name} survival")
            ax.plot(ks, [c if c is not None else float("nan") for c in e["conditional_accept_by_position"]],
                    "x--", color=color, alpha=0.6, label=f"{name} conditional")
        ax.set_title(f"{b} (τ " + ", ".join(_fmt(d['benchmarks'][b]['tau']) for d in drafters.values()) + ")")
        ax.set_xlabel("draft position k")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("acceptance")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / "acceptance_by_position.png"))

    bars = {name: [d["benchmarks"][b]["speedup"] for b in benches] for name, d in drafters.items()}
    for base in sorted({x for e in report["benchmarks"].values() for x in e["baselines"]}):
        bars[base] = [report["benchmarks"][b]["baselines"].get(base, {}).get("speedup") for b in benches]
    fig, ax = plt.subplots(figsize=(max(5, 1.5 * len(benches) * max(1, len(bars)) / 2), 3.6))
    width = 0.8 / len(bars)
    for i, (name, ys) in enumerate(bars.items()):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(benches))]
        bars_i = ax.bar(xs, [y if y is not None else 0 for y in ys], width, label=name, color=f"C{i}")
        ax.bar_label(bars_i, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(benches)), benches)
    ax.set_ylabel(f"speedup vs plain {report['dtype']} decoding")
    ax.set_title(f"{report['target']} · {report['device']} · T={report['temperature']} · {report['mode']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out / "speedup.png"))

    if calibration and calibration.get("reliability"):  # the calibrator's own diagram, from calibration.json
        from .calibrate import Calibration, plot_reliability
        paths.append(plot_reliability(Calibration.from_json(calibration), out / "reliability.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
