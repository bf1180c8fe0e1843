"""`data.capture_features` on the real target, measured: what capture costs `dspark data`, how close the captured
features are to the trainer's own, and what training on them gains.

    python -m bench.capture_check [--dtype auto|float32] [--prompts 96] [--max-new-tokens 128] [--steps 24]

1) `dspark data` on the same prompts (recipes/smollm2_135m.yaml, greedy so both runs answer alike) without and
   with capture, one after the other in this process: seconds each, and the answers must be identical;
2) every captured conversation against the target's features of the same tokens computed online, alone and in
   the trainer's padded batch (the trainer's own path): both rounded through the storage format, the worst
   difference in units of the row's scale and the share of stored values that are bit-identical;
3) three short trainings on the captured data, same seed and steps: online (no cache), a cold cache (online, rounded
   through the format as written: what training without capture sees) and the captured features (no target
   forward): supervised tokens per second, target seconds, the first step's loss (same weights: only the features
   differ) and the mean loss of the second half against the cold run.
Writes eval/results/capture-<cpu>[-<dtype>].{json,md} (runs smaller than the defaults: under --out only).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent

RECIPE = "recipes/smollm2_135m.yaml"


def data_overrides(out: Path, args, name: str) -> list[str]:
    return [f"target.dtype={args.dtype}", "data.conversations=null", f"data.output={out / name}.jsonl",
            f"data.max_prompts={args.prompts}", f"data.max_new_tokens={args.max_new_tokens}", "data.temperature=0",
            "data.feature_cache=bfloat16", f"data.feature_cache_dir={out / 'features'}",
            f"data.heldout={args.heldout}"]


def regenerate(out: Path, args, target) -> dict:
    from dspark_train.config import load_recipe
    from dspark_train.data.examples import read_jsonl
    from dspark_train.data.regenerate import run_data

    res = {}
    for name, capture in (("plain", False), ("captured", True)):
        recipe = load_recipe(REPO / RECIPE, data_overrides(out, args, name) + [f"data.capture_features={capture}"])
        t0 = time.perf_counter()
        path = run_data(recipe, target=target)
        recs = read_jsonl(path)
        res[name] = {"seconds": time.perf_counter() - t0, "conversations": len(recs),
                     "tokens": sum(r["n_tokens"] for r in recs), "answers": [r["conversations"] for r in recs]}
    same = res["plain"].pop("answers") == res["captured"].pop("answers")
    return {**res, "answers_identical": same, "capture_overhead": res["captured"]["seconds"] / res["plain"]["seconds"]}


def agreement(out: Path, args, target) -> dict:
    """Captured vs online rows of every captured conversation, in the storage format."""
    import torch

    from dspark_train.config import load_recipe
    from dspark_train.data.examples import conversations_paths, load_conversations, make_batch, tokenize
    from dspark_train.data.feature_cache import decode, encode, open_cache

    recipe = load_recipe(REPO / RECIPE, data_overrides(out, args, "captured") + ["data.capture_features=true"])
    cache = open_cache(recipe, out / "unused", target, conversations_paths(recipe), 0)
    examples, _ = tokenize(load_conversations(conversations_paths(recipe)), target.tokenizer,
                           recipe.data.max_seq_len, 1)
    fmt = recipe.data.feature_cache

    def rows(ids: torch.Tensor, mask=None) -> torch.Tensor:
        return decode(encode(target.forward_features(ids, mask).rows(), fmt), torch.float32)

    def compare(a: torch.Tensor, b: torch.Tensor, acc: dict) -> None:
        scale = torch.maximum(a.abs().amax(-1, keepdim=True), b.abs().amax(-1, keepdim=True)).clamp_min(1e-12)
        rel = (a - b).abs() / scale
        acc["max_rel_to_row_scale"] = max(acc.get("max_rel_to_row_scale", 0.0), rel.max().item())
        acc["sum_rel"] = acc.get("sum_rel", 0.0) + rel.sum().item()
        acc["equal"] = acc.get("equal", 0) + (a == b).sum().item()
        acc["values"] = acc.get("values", 0) + a.numel()

    captured_vs_alone, batched_vs_alone = {}, {}
    missing = [e.id for e in examples if not cache.has(e.id)]
    by_len = sorted((e for e in examples if cache.has(e.id)), key=lambda e: len(e.input_ids))
    for i in range(0, len(by_len), 4):  # the trainer's path: right-padded batches of similar lengths
        group = by_len[i:i + 4]
        batch = make_batch(group, [0] * len(group), 1, 1, target.tokenizer.pad_token_id)
        batched = rows(batch.input_ids, batch.attention_mask)
        for j, e in enumerate(group):
            alone = rows(torch.tensor([e.input_ids]))[0]
            compare(cache.read(e.id, torch.float32), alone, captured_vs_alone)
            compare(batched[j, :len(e.input_ids)], alone, batched_vs_alone)
    for acc in (captured_vs_alone, batched_vs_alone):
        acc["equal_share"] = acc.pop("equal") / max(1, acc["values"])
        acc["mean_rel_to_row_scale"] = acc.pop("sum_rel") / max(1, acc["values"])
    return {"format": fmt, "sequences": len(by_len), "not_captured": missing,
            "captured_vs_alone": captured_vs_alone, "trainer_batch_vs_alone": batched_vs_alone}


def train(out: Path, args, name: str, extra: list[str]) -> dict:
    run = out / f"train-{name.replace(' ', '-')}"
    sets = data_overrides(out, args, "captured") + [
        f"train.output_dir={run}", f"train.max_steps={args.steps}", "train.max_minutes=null", "logging.trackers=[]",
        "logging.progress_bar=false", "train.eval_every=100000", f"train.checkpoint_every={args.steps}", *extra]
    cmd = [sys.executable, "-m", "dspark_train.train", RECIPE, *[a for s in sets for a in ("--set", s)]]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((run / "train_summary.json").read_text())
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "train/loss" in s]
    return {"command": " ".join(cmd), "tokens_per_s": summary["tokens_per_s"], "steps": summary["steps"],
            "tokens": summary["tokens"], "train_seconds": summary["train_seconds"],
            "target_seconds": sum(s.get("time/target_s", 0.0) for s in steps),
            "feature_cache": summary["feature_cache"], "loss": [s["train/loss"] for s in steps]}


def markdown(res: dict) -> str:
    from dspark_train.hardware import Capabilities

    g, a, t = res["regenerate"], res["agreement"], res["train"]
    lines = [f"# Feature capture in `dspark data` ({Capabilities.from_dict(res['machine']).describe()}, target "
             f"{res['dtype']})", "",
             f"{res['prompts']} prompts, greedy, ≤ {res['max_new_tokens']} new tokens, batches of "
             f"{res['gen_batch_size']}; the captured features stored as {a['format']}.", "",
             "| `dspark data` | seconds | conversations | tokens generated |", "|---|---|---|---|"]
    for name in ("plain", "captured"):
        lines.append(f"| {name} | {g[name]['seconds']:.1f} | {g[name]['conversations']} | {g[name]['tokens']} |")
    lines += ["", f"Capture costs {100 * (g['capture_overhead'] - 1):+.1f}% of the run; answers identical: "
              f"{'yes' if g['answers_identical'] else '**no**'}.", "",
              f"Agreement over {a['sequences']} captured conversations ({len(a['not_captured'])} not captured), "
              "each against the target's features of the same tokens computed alone, both stored as "
              f"{a['format']}:", "",
              "| rows | mean \\|Δ\\| / row scale | worst \\|Δ\\| / row scale | bit-identical stored values |",
              "|---|---|---|---|"]
    for key, label in (("captured_vs_alone", "captured in `dspark data`"),
                       ("trainer_batch_vs_alone", "the trainer's own padded batch (reference)")):
        lines.append(f"| {label} | {a[key]['mean_rel_to_row_scale']:.1e} | {a[key]['max_rel_to_row_scale']:.1e} | "
                     f"{100 * a[key]['equal_share']:.2f}% |")
    cold = t["cold cache"]["loss"]
    half = len(cold) // 2
    lines += ["", f"Training {t['online']['steps']} steps on the captured data (same seed):", "",
              "| features | supervised tok/s | × online | target s | step-1 loss, Δ vs cold cache | mean loss of steps "
              f"{half + 1}–{len(cold)} |", "|---|---|---|---|---|---|"]
    for name, r in t.items():
        loss = r["loss"]
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / t['online']['tokens_per_s']:.2f}× | "
                     f"{r['target_seconds']:.1f} | {loss[0]:.5f} ({(loss[0] - cold[0]) / cold[0]:+.1e}) | "
                     f"{sum(loss[half:]) / len(loss[half:]):.4f} |")
    lines += ["", "Commands:", ""] + [f"    {c}" for c in res["commands"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto", help="target.dtype (float32: the exact comparison)")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=8, help="data.heldout for the short trainings")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default="runs/capture-check")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    if out.exists():
        sys.exit(f"{out} exists: remove it or pass another --out (a measurement starts from nothing)")
    out.mkdir(parents=True)
    from dspark_train.config import load_recipe
    from dspark_train.hardware import detect
    from dspark_train.target import load_target

    recipe = load_recipe(REPO / RECIPE, [f"target.dtype={args.dtype}"])
    target = load_target(recipe.target)
    res = {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "gen_batch_size": recipe.data.gen_batch_size,
           "dtype": target.precision.value, "machine": detect().to_dict()}
    res["regenerate"] = regenerate(out, args, target)
    print(json.dumps(res["regenerate"], indent=1), flush=True)
    res["agreement"] = agreement(out, args, target)
    print(json.dumps(res["agreement"], indent=1), flush=True)
    del target
    res["train"] = {name: train(out, args, name, extra) for name, extra in (
        ("online", ["data.feature_cache='off'"]),
        ("cold cache", ["data.feature_cache_dir=null"]),  # the run's own cache: computed online, rounded as written
        ("captured", []))}
    res["commands"] = ["python " + " ".join(sys.argv)] + [r["command"] for r in res["train"].values()]
    from dspark_train.hardware import Capabilities
    stem = REPO / "eval" / "results" / f"capture-{Capabilities.from_dict(res['machine']).slug}"
    stem = stem.with_name(stem.name + ("" if args.dtype == "auto" else f"-{args.dtype}"))
    if (args.prompts, args.max_new_tokens, args.steps) < (96, 128, 24):  # a smoke run is not the measurement
        stem = out / "capture"
    write_result(stem, res, markdown(res), "Feature capture in dspark data", res["machine"], res["commands"])
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
