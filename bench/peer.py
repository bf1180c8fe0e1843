"""`make peer`: our trainer against a peer trainer, vllm-project/speculators 0.9 (DSpark and DFlash drafters), on
the same work, at equal wall-clock and equal supervised tokens, evaluated by one decoder in one run.

    python -m bench.peer [--minutes 5,40] [--peers dspark,dflash] [--n 6] [--max-new-tokens 64] [--out runs/peer]

Same target (SmolLM2-135M-Instruct, the dtype `auto` picks), same regenerated conversations and held-out split
(recipes/smollm2_135m.yaml), same feature layers (speculators' `--target-layer-ids` are hidden-state indices, as ours),
same block size (8) and draft depth (our recipe's 1 layer), bidirectional blocks over the whole context (speculators'
`--full-attention-indices`: its default layers are causal inside the block, which our decoder refuses to read).
Everything else is each trainer's own: ours as shipped (recipes/smollm2_135m.yaml; the committed result: L1 loss); the
peer's 0.9.0 defaults (Muon at lr 1e-3, linear decay with 1 % warmup, 512 anchors per packed row, KL for DSpark, CE with
D-PACE weights for DFlash, random init). Steps: 1) write the peer's data, the tokenised training conversations and the
target's hidden states at those layers plus the final layer before its norm (its file layout, `hs_<row>.safetensors`);
2) per budget, train ours under `train.max_minutes` and each peer under the max-steps a short probe of its step time
*alone* gives for the same minutes (its schedule then completes, as ours does), one thread each, all at once (equal
load: three trainings on two cores slow each, so the peers, bounded by steps, run past the budget and ours, bounded by
the clock, does not; the table shows each one's seconds); then ours again at the best peer's tokens (equal tokens).
Finished runs are reused by a rerun; 3) read every drafter through our speculators reader and evaluate all in one run:
held-out τ_greedy (greedy drafting replayed at every held-out anchor, calibration's `anchor_stats`), chain τ and
acceptance by position on the four dev sets (`dspark eval --mode chain --compare`). Writes
eval/results/peer-<cpu>.{json,md,png}.

speculators' trainer targets CUDA. On CPU it runs with the flags `--draft-attn-impl sdpa --loss-implementation
eager --hidden-states-dtype float32 --num-workers 0 --on-missing raise --no-resume-from-checkpoint` and five
patches applied at run time by `peer_train` below (never to its files): the rank device (`.to(0)`), the step timer's
accelerator sync, autocast's device type, the resume device, and fp32 checkpoints (it saves bf16 by default).
EAGLE-3, its third drafter kind, trains but our decoder cannot read it (an autoregressive drafter with its own KV
cache and no block): it is left out, and the report says so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.resultfile import write_result

REPO = Path(__file__).resolve().parent.parent

RECIPE = "recipes/smollm2_135m.yaml"
OVERRIDES: list[str] = []  # --set: applied to the recipe wherever it is read (a smoke run: data.max_prompts=64)
ENGINE_PY = REPO / ".venv-engine" / "bin" / "python"
BENCHMARKS = ("gsm8k", "mt-bench", "humaneval", "mbpp")
PEER_FLAGS = ["--draft-attn-impl", "sdpa", "--loss-implementation", "eager", "--hidden-states-dtype", "float32",
              "--num-workers", "0", "--on-missing", "raise", "--no-resume-from-checkpoint", "--epochs", "1",
              "--total-seq-len", "2048", "--train-data-ratio", "0.99", "--log-freq", "10", "--seed", "0"]


# =========================================================================== 1. the peer's data (our venv)
def prepare(out: Path) -> dict:
    """Tokenised training conversations (our split, our chat template path) and the target's hidden states in
    speculators' layout. Returns facts about them (rows, tokens, layers)."""
    import torch
    from safetensors.torch import save_file

    from dspark_train.config import load_recipe
    from dspark_train.data.examples import conversations_paths, load_conversations, split_heldout, tokenize
    from dspark_train.target import load_target

    done = out / "data" / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text())
    recipe = load_recipe(REPO / RECIPE, OVERRIDES)
    target = load_target(recipe.target)
    convs = load_conversations(conversations_paths(recipe), recipe.data.max_prompts)
    train, _ = split_heldout(convs, recipe.data.heldout, recipe.data.seed)
    examples, _ = tokenize(train, target.tokenizer, recipe.data.max_seq_len, recipe.drafter.block_size)
    hs_dir = out / "data" / "hidden_states"
    hs_dir.mkdir(parents=True, exist_ok=True)
    captured = {}
    norm = target.model.get_decoder().norm
    hook = norm.register_forward_pre_hook(lambda m, a: captured.__setitem__("pre_norm", a[0]))
    rows = out / "data" / "rows.jsonl"
    with open(rows, "w") as f, torch.no_grad():
        for i, e in enumerate(examples):
            ids = torch.tensor([e.input_ids], device=target.device)
            feats = target.forward_features(ids)  # our feature layers = hidden-state indices
            d = target.hidden_size
            stack = torch.cat((feats.features[0].view(len(e.input_ids), -1, d), captured["pre_norm"][0][:, None]), 1)
            save_file({"hidden_states": stack.to(torch.bfloat16).contiguous().cpu(),
                       "token_ids": ids[0].cpu().long().contiguous()}, str(hs_dir / f"hs_{i}.safetensors"))
            f.write(json.dumps({"input_ids": e.input_ids, "loss_mask": e.loss_mask}) + "\n")
            if i % 200 == 0:
                print(f"hidden states: {i}/{len(examples)}", flush=True)
    hook.remove()
    facts = {"rows": len(examples), "tokens": sum(len(e.input_ids) for e in examples),
             "feature_layers": target.feature_layers, "verifier": str(target_dir(recipe)),
             "dtype": str(target.dtype).removeprefix("torch."), "block_size": recipe.drafter.block_size}
    done.write_text(json.dumps(facts))
    return facts


def target_dir(recipe) -> Path:
    from dspark_train.target import cache_root, pypi_target_dir
    return pypi_target_dir(recipe.target.model[5:], cache_root(recipe.target))[0]


# =========================================================================== 2. training (peer: its own venv)
PEER_LAUNCHER = r'''
import os, sys, time, json, torch
threads = int(sys.argv[1])
torch.set_num_threads(threads)
from datasets import Dataset
rows, data = sys.argv[2], sys.argv[3]
if not os.path.isdir(os.path.join(data, "dataset")):
    recs = [json.loads(l) for l in open(rows)]
    ds = Dataset.from_dict({"input_ids": [r["input_ids"] for r in recs], "loss_mask": [r["loss_mask"] for r in recs],
                            "seq_len": [len(r["input_ids"]) for r in recs]})
    ds.set_format("torch")
    ds.save_to_disk(os.path.join(data, "dataset"))
import speculators.train.trainer as T
import speculators.train.checkpointer as C
T.get_local_rank = lambda: "cpu"                      # .to(0) on model and batches
def _mark(self, name):
    if self.enabled:
        self._marks[name] = time.perf_counter()
T._StepTimer.mark = _mark                             # no torch.accelerator.synchronize()
T._StepTimer.now = lambda self: time.perf_counter() if self.enabled else None
_init = T.Trainer.__init__
def _init_cpu(self, *a, **k):
    _init(self, *a, **k)
    self.device_type = "cpu"                          # autocast falls back to "cuda"
T.Trainer.__init__ = _init_cpu
C.get_current_device = lambda: "cpu"                  # resume loads to cuda:0
C.SingleGPUCheckpointer.save_checkpoint.__wrapped__.__defaults__ = (torch.float32,)  # bf16 by default
from speculators.train.cli import main
from speculators.train.config import TrainConfig
start = time.perf_counter()
main(TrainConfig.resolve(sys.argv[4:]))
print(json.dumps({"peer_seconds": time.perf_counter() - start}))
'''


def peer_args(kind: str, facts: dict, data: Path, save: Path, steps: int) -> list[str]:
    layers = [str(x) for x in facts["feature_layers"]]
    return ["--speculator-type", kind, "--verifier-name-or-path", facts["verifier"], "--data-path",
            str(data / "dataset"), "--hidden-states-path", str(data / "hidden_states"), "--save-path", str(save),
            "--target-layer-ids", *layers, "--block-size", str(facts["block_size"]), "--num-layers", "1",
            "--full-attention-indices", "0", "--max-steps", str(steps), *PEER_FLAGS]


def peer_train(kind: str, facts: dict, out: Path, label: str, threads: int, steps: int) -> dict:
    """One speculators run of `steps` steps into <out>/<kind>-<label>; returns its wall-clock, steps and training
    tokens. A finished run of the same steps is reused (a rerun after an interruption resumes the comparison)."""
    save = out / f"{kind}-{label}"
    log = save.with_suffix(".log")
    record = save / "peer_run.json"
    if record.is_file() and json.loads(record.read_text())["steps"] == steps:
        return json.loads(record.read_text())
    save.mkdir(parents=True, exist_ok=True)
    launcher = out / "peer_launcher.py"
    launcher.write_text(PEER_LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    cmd = [str(ENGINE_PY), str(launcher), str(threads), str(out / "data" / "rows.jsonl"), str(out / "data"),
           *peer_args(kind, facts, out / "data", save, steps)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"speculators {kind} failed (exit {proc.returncode}); see {log}")
    ckpt = max((p for p in save.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    result = {"trainer": f"speculators {kind}", "dir": str(ckpt), "steps": steps, "seconds": seconds,
              "tokens": steps * tokens_per_peer_step(facts),
              "command": " ".join(cmd[:1] + ["peer_launcher.py"] + cmd[2:])}
    record.write_text(json.dumps(result))
    return result


def tokens_per_peer_step(facts: dict) -> float:
    """Training tokens a peer step sees: a packed row of up to --total-seq-len tokens of whole conversations (prompt
    and answer, as our trainer's count: every token whose target features the step reads)."""
    per_row = facts["tokens"] / facts["rows"]
    return per_row * max(1, int(2048 // per_row))


def probe_peer(kind: str, facts: dict, out: Path, threads: int) -> float:
    """Seconds per optimizer step of the peer on this machine, alone (a 12-step run, the first 2 excluded by timing
    whole runs of 2 and 12 steps; reused from a finished probe)."""
    times = []
    for steps in (2, 12):
        times.append(peer_train(kind, facts, out, f"probe{steps}", threads, steps)["seconds"])
    return (times[1] - times[0]) / 10


def ours_train(out: Path, minutes: float, threads: int, max_steps: int | None = None, tag: str = "") -> dict:
    run = out / f"ours-{minutes:g}min{tag}"
    sets = [*OVERRIDES, f"train.output_dir={run}", f"train.num_threads={threads}", "logging.trackers=[]",
            "logging.progress_bar=false", f"train.max_minutes={minutes}"]
    if max_steps:
        sets += [f"train.max_steps={max_steps}", "train.max_minutes=null"]
    cmd = [sys.executable, "-m", "dspark_train.train", RECIPE] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    if not (run / "final" / "model.safetensors").is_file():
        with open(str(run) + ".log", "w") as f:
            if subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
                raise RuntimeError(f"our trainer failed; see {run}.log")
    summary = json.loads((run / "train_summary.json").read_text())
    return {"trainer": "dspark-train", "dir": str(run), "steps": summary["steps"], "tokens": summary["tokens"],
            "seconds": summary["train_seconds"], "wall_seconds": time.perf_counter() - t0, "command": " ".join(cmd)}


# =========================================================================== 3. one evaluation of everything
def heldout_tau(target, drafter, recipe) -> dict:
    """Greedy drafting replayed at every anchor of the held-out conversations (calibration's anchor_stats):
    τ_greedy = 1 + mean accepted drafts, and prefix survival by position."""
    import numpy as np

    from dspark_train.calibration.heldout import anchor_stats
    from dspark_train.data.examples import conversations_paths, load_conversations, split_heldout, tokenize

    convs = load_conversations(conversations_paths(recipe), recipe.data.max_prompts)
    _, held = split_heldout(convs, recipe.data.heldout, recipe.data.seed)
    examples, _ = tokenize(held, target.tokenizer, recipe.data.max_seq_len, recipe.drafter.block_size)
    stats = anchor_stats(target, drafter, examples)
    full = stats.depth == stats.gamma  # anchors whose whole block lies in the answer, on the greedy path
    survived = stats.survived()[full]
    return {"tau_greedy": float(1 + stats.n_spine[full].mean()), "anchors": int(full.sum()),
            "survival_by_position": [float(x) for x in np.mean(survived, 0)]}


def evaluate(out: Path, runs: dict, n: int, max_new: int) -> dict:
    from dspark_train.artifacts.reader import load_artifact
    from dspark_train.config import load_recipe
    from dspark_train.target import load_target

    recipe = load_recipe(REPO / RECIPE, OVERRIDES)
    target = load_target(recipe.target)
    for name, r in runs.items():
        drafter = load_artifact(r["dir"], target=target)
        r["heldout"] = heldout_tau(target, drafter, recipe)
        print(f"{name}: held-out τ_greedy {r['heldout']['tau_greedy']:.3f}", flush=True)
    names = list(runs)
    eval_dir = out / "eval"
    cmd = [sys.executable, "-m", "dspark_train.cli", "eval", runs[names[0]]["dir"], "--compare",
           *[runs[k]["dir"] for k in names[1:]], "--mode", "chain", "--baselines", "", "--n", str(n),
           "--max-new-tokens", str(max_new), "--benchmarks", ",".join(BENCHMARKS), "--no-fastest-plain",
           "--out", str(eval_dir)]
    subprocess.run(cmd, cwd=REPO, check=True)
    report = json.loads((eval_dir / "report.json").read_text())
    for name, d in zip(names, report["drafters"].values()):
        runs[name]["dev_sets"] = {b: {"tau": e["tau"], "accept_rate_by_position": e["accept_rate_by_position"],
                                      "speedup": e["speedup"]} for b, e in d["benchmarks"].items()}
    return {"eval_command": " ".join(cmd), "machine": report["machine"], "dtype": report["dtype"]}


# =========================================================================== outputs
def markdown(res: dict) -> str:
    from dspark_train.hardware import Capabilities

    lines = [f"# dspark-train vs speculators 0.9 ({Capabilities.from_dict(res['machine']).describe()}, target "
             f"{res['dtype']})", "", res["setup"], "",
             "| budget | drafter | steps | supervised tokens | train s | held-out τ_greedy | "
             + " | ".join(f"{b} τ" for b in BENCHMARKS) + " |", "|---|---|---|---|---|---|" + "---|" * len(BENCHMARKS)]
    for name, r in res["runs"].items():
        taus = [f"{r['dev_sets'][b]['tau']:.3f}" if b in r.get("dev_sets", {}) else "—" for b in BENCHMARKS]
        lines.append(f"| {r['budget']} | {name} | {r['steps']} | {r['tokens'] / 1e3:.0f}k | {r['seconds']:.0f} | "
                     f"{r['heldout']['tau_greedy']:.3f} | " + " | ".join(taus) + " |")
    lines += ["", "Goal (ours ≥ 1.10 × the best peer's τ on every dev set at both budgets):", ""]
    for budget, g in res["goal"].items():
        lines.append(f"- {budget}: " + ", ".join(f"{b} {v:.2f}×" for b, v in g.items()))
    lines += ["", "EAGLE-3 (speculators' third kind) is not compared: our decoder cannot read it (an autoregressive "
              "drafter with its own KV cache, no block).", "", "Commands:", ""]
    lines += [f"    {c}" for c in res["commands"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["runs"])
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        r = res["runs"][name]
        vals = [r["heldout"]["tau_greedy"]] + [r["dev_sets"].get(b, {}).get("tau", 0) for b in BENCHMARKS]
        ax.bar([j + i * width for j in range(len(vals))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(BENCHMARKS) + 1)], ["held-out τ_greedy", *BENCHMARKS])
    ax.set_ylabel("τ (chain)")
    ax.set_ylim(1, None)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below the axes: bars stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", default="5,40", help="wall-clock training budgets")
    ap.add_argument("--peers", default="dspark,dflash")
    ap.add_argument("--n", type=int, default=6, help="prompts per dev set")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training; every budget's trainings "
                    "(ours and each peer) run at once, so they share the machine alike")
    ap.add_argument("--out", default="runs/peer")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every stage (smoke: --set data.max_prompts=64)")
    args = ap.parse_args()
    OVERRIDES.extend(args.overrides)
    if not ENGINE_PY.is_file():
        sys.exit(f"{ENGINE_PY} missing: `make {ENGINE_PY.parent.parent.name}/.installed` (or `make peer`) first")
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    facts = prepare(out)
    threads = args.threads
    peers = args.peers.split(",")
    rates = {k: probe_peer(k, facts, out, threads) for k in peers}
    print(f"peer seconds per step ({threads} thread(s)): {rates}", flush=True)
    runs: dict[str, dict] = {}
    for minutes in (float(m) for m in args.minutes.split(",")):
        jobs = {f"dspark-train {minutes:g} min": lambda m=minutes: ours_train(out, m, threads)}
        for k in peers:
            steps = max(10, int(60 * minutes / rates[k]))
            jobs[f"speculators {k} {minutes:g} min"] = lambda k=k, m=minutes, s=steps: peer_train(
                k, facts, out, f"{m:g}min", threads, s)
        with ThreadPoolExecutor(len(jobs)) as pool:  # side by side: equal wall-clock under equal load
            done = dict(zip(jobs, pool.map(lambda f: f(), jobs.values())))
        for name, r in done.items():
            runs[name] = {**r, "budget": f"{minutes:g} min"}
        best = max((runs[f"speculators {k} {minutes:g} min"] for k in peers), key=lambda r: r["tokens"])
        ours_steps = runs[f"dspark-train {minutes:g} min"]
        per_step = ours_steps["tokens"] / max(1, ours_steps["steps"])
        tag = f"-tokens-of-{best['trainer'].split()[-1]}"
        eq = ours_train(out, minutes, os.cpu_count() or 2, max_steps=max(10, int(best["tokens"] / per_step)),
                        tag=tag)  # a step budget: its speed does not matter
        runs[f"dspark-train at {best['trainer']}'s tokens ({minutes:g} min budget)"] = {**eq,
                                                                                         "budget": f"{minutes:g} min"}
    meta = evaluate(out, runs, args.n, args.max_new_tokens)
    goal = {}
    for minutes in args.minutes.split(","):
        ours = runs[f"dspark-train {float(minutes):g} min"]["dev_sets"]
        peer = [r["dev_sets"] for n, r in runs.items()
                if n.startswith("speculators") and n.endswith(f"{float(minutes):g} min")]
        goal[f"{float(minutes):g} min"] = {b: ours[b]["tau"] / max(p[b]["tau"] for p in peer) for b in BENCHMARKS}
    from dspark_train.hardware import Capabilities
    res = {"runs": runs, "goal": goal, "peer_seconds_per_step": rates, "facts": facts, **meta,
           "setup": f"{facts['rows']} training conversations ({facts['tokens'] / 1e3:.0f}k tokens), feature layers "
                    f"{facts['feature_layers']}, block {facts['block_size']}, 1 draft layer; {threads} thread(s) per "
                    f"training, all of a budget at once; dev sets: {args.n} prompts × {args.max_new_tokens} tokens, "
                    "chain drafting, greedy.",
           "commands": ["python " + " ".join(sys.argv), meta["eval_command"]] + [r["command"] for r in runs.values()]}
    stem = REPO / "eval" / "results" / f"peer-{Capabilities.from_dict(res['machine']).slug}"
    if OVERRIDES:  # a changed recipe (a smoke run) is not the comparison: its files stay in --out
        stem = out / "peer"
    write_result(stem, res, markdown(res), "dspark-train vs speculators 0.9 at equal budgets", res["machine"],
                 res["commands"])
    plot(res, stem.with_suffix(".png"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
