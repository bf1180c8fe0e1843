"""`make gpu-check`: the CUDA path, in one prepared script that fits a short GPU loan (≤ 8 minutes by default).

    python -m bench.gpu_check [--minutes 8] [--out runs/gpu-check] [--engine-python VENV/bin/python]

1. exactness: the real SmolLM2-135M-Instruct in fp32 on CUDA, an untrained target-initialised drafter, chain, tree
   and hybrid greedy decoding of dev prompts against the target's own `generate`, token for token;
2. a bf16 training step under accelerate (`accelerate launch --mixed_precision bf16 -m dspark_train.train`, the
   demo recipe, 20 steps), its supervised tokens per second;
3. the long recipe (recipes/smollm2_135m_long.yaml) for the rest of the time budget, with held-out evaluations
   along the way: τ_greedy and tokens per second as it trains;
4. that DSpark drafter served by vLLM's GPU runner (method "dspark", which vLLM's CPU runner refuses) beside our
   decoder: `dspark eval RUN --engine vllm` on two dev sets (evaluation/served.py), fp32 on both sides: served τ,
   acceptance by position and speedup next to ours, the served output against the engine's plain one, the < 50 %
   alarm. Runs only where --engine-python (default $GPU_ENGINE_PY, else this interpreter) has a CUDA vLLM
   (`pip install vllm==0.32.0` in a venv of its own: its pins differ from this project's); its minutes
   (--served-minutes) come off stage 3's. Without vLLM it is recorded as not run, with the reason.
Prints each stage's result and writes them to <out>/gpu_check.json. Needs a CUDA build of torch in this
interpreter (the project pins a CPU wheel; on a GPU machine install the CUDA wheel of the same version first).
Exits 1 if any stage fails or a greedy output differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

DEV_SETS = ("gsm8k", "humaneval", "mbpp", "mt-bench")


def exactness(data_root: Path, per_set: int, new_tokens: int, device: str) -> dict:
    from dspark_train.config import load_recipe
    from dspark_train.data.chat import prompt_ids, user_messages
    from dspark_train.decoding import SpeculativeDecoder, TreePolicy
    from dspark_train.drafters import build_drafter
    from dspark_train.target import load_target

    recipe = load_recipe(REPO / "recipes" / "smollm2_135m.yaml",
                         ["target.dtype=float32", "drafter.draft_vocab_size=null"])
    target = load_target(recipe.target, device=device)
    drafter = build_drafter(recipe.drafter, target).eval()
    dec = SpeculativeDecoder(target, drafter, tree=TreePolicy([3, 2, 1, 1], beam=3, node_budget=10))
    checked, mismatches = 0, []
    for name in DEV_SETS:
        lines = (data_root / "eval" / f"{name}.jsonl").read_text().splitlines()[:per_set]
        for line in lines:
            p = prompt_ids(target.tokenizer, user_messages(json.loads(line)["turns"][:1]))[-512:]
            x = torch.tensor([p], device=target.device)
            ref = target.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                        max_new_tokens=new_tokens, pad_token_id=target.tokenizer.pad_token_id,
                                        eos_token_id=None)[0, len(p):].tolist()
            for mode, hybrid in (("chain", False), ("tree", False), ("tree", True)):
                out = dec.generate(p, new_tokens, mode=mode, hybrid=hybrid, eos_token_id=[]).tokens
                checked += 1
                if out != ref:
                    mismatches.append({"set": name, "mode": mode + ("+hybrid" if hybrid else ""),
                                       "first_diff": next(i for i, (a, b) in enumerate(zip(out, ref)) if a != b)})
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return {"device": name, "decodes": checked, "mismatches": mismatches,
            "ok": not mismatches}


def train(cmd: list[str], run: Path, log: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res = {"command": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - start, 1), "log": str(log)}
    summary = run / "train_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        res |= {"steps": s["steps"], "tokens": s["tokens"], "tokens_per_s": round(s["tokens_per_s"], 1),
                "tau_greedy": s["final"].get("tau_greedy"), "dtype": s["hardware"]["target_dtype"]["value"]}
    return res


def served_argv(run: Path, engine_python: str, out: Path, data_root: str, prompts: int, new_tokens: int) -> list[str]:
    """Stage 4's `dspark eval --engine vllm`: two dev sets, fp32 on both sides, plain decoding the only baseline,
    eager engines (CUDA-graph capture would spend a short loan's minutes on two server starts)."""
    return [sys.executable, "-m", "dspark_train.cli", "eval", str(run), "--engine", "vllm", "--engine-python",
            engine_python, "--engine-args", "--enforce-eager", "--benchmarks", "gsm8k,mbpp", "--n", str(prompts),
            "--max-new-tokens", str(new_tokens), "--dtype", "float32", "--baselines", "", "--no-fastest-plain",
            "--data-root", data_root, "--no-progress", "--out", str(out)]


def served_summary(served: dict) -> dict:
    """What stage 4 reports from served.json: what was served where, τ side by side, output checks, alarms."""
    e = served["engine"]
    return {"engine": f"{e['name']} {e.get('version')}", "method": e.get("method"), "device": served["device"],
            "alarms": len(served["alarms"]),
            "benchmarks": {b: {"tau_ours": x["ours"]["tau"], "tau_served": x["served"]["tau"],
                               "tau_ratio": x["ratio"]["tau"], "speedup_ours": x["ours"]["speedup"],
                               "speedup_served": x["served"]["speedup"],
                               "served_equals_engine_plain": f"{x['served']['identical_to_engine_plain']}/"
                                                             f"{x['served']['n_prompts']}"}
                           for b, x in served["benchmarks"].items()}}


def served(run: Path, engine_python: str, out: Path, data_root: str, timeout: float) -> dict:
    """4. the drafter served by vLLM on this GPU beside our decoder; {"ran": False, "why"} without vLLM or a
    trained drafter."""
    from dspark_train.config import RecipeError
    from dspark_train.evaluation.served import SERVED_DIR, SERVED_JSON, engine_python as find_engine

    try:
        find_engine(engine_python)
    except RecipeError as e:
        return {"ran": False, "why": str(e)}
    if not (run / "final").is_dir():
        return {"ran": False, "why": f"{run}: no trained drafter (stage 3 did not finish)"}
    cmd = served_argv(run, engine_python, out, data_root, 2, 64)
    with open(out.parent / "served.log", "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res = {"ran": True, "command": " ".join(cmd), "rc": rc, "log": str(out.parent / "served.log")}
    path = out / SERVED_DIR / SERVED_JSON
    if path.is_file():
        res |= served_summary(json.loads(path.read_text()))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="the whole check's budget")
    ap.add_argument("--data-root", default=str(REPO / ".." / "shared" / "data"))
    ap.add_argument("--prompts", type=int, default=5, help="dev prompts per set for the exactness check")
    ap.add_argument("--out", default="runs/gpu-check")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (slow; no CUDA claim)")
    ap.add_argument("--engine-python", default=os.environ.get("GPU_ENGINE_PY", sys.executable),
                    help="an interpreter with a CUDA vLLM for stage 4 (default $GPU_ENGINE_PY, else this one)")
    ap.add_argument("--served-minutes", type=float, default=4.0, help="stage 4's share of --minutes")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu-check: torch {torch.__version__} sees no CUDA device (a CPU wheel, or no GPU)")
    deadline = time.perf_counter() + 60 * args.minutes
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    res = {"torch": torch.__version__, "cuda": torch.version.cuda}

    res["exactness"] = exactness(Path(args.data_root), args.prompts, 32, args.device)
    print(f"1. fp32 greedy on {args.device}:", json.dumps(res["exactness"]), flush=True)

    step_run = out / "bf16-step"
    sets = ["train.max_minutes=null", "train.max_steps=20", "train.eval_every=20", "train.checkpoint_every=20",
            f"train.output_dir={step_run}", "target.dtype=bfloat16", "logging.trackers=[]"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16",
           *(["--cpu"] if args.device == "cpu" else []),
           "-m", "dspark_train.train", "recipes/smollm2_135m.yaml"] + [a for s in sets for a in ("--set", s)]
    res["bf16_step"] = train(cmd, step_run, out / "bf16-step.log", max(60.0, deadline - time.perf_counter()))
    print("2. bf16 training under accelerate:", json.dumps(res["bf16_step"]), flush=True)

    from dspark_train.config import RecipeError
    from dspark_train.evaluation.served import engine_python as find_engine
    try:
        find_engine(args.engine_python)
        reserve = args.served_minutes  # stage 4 will run: its minutes come off the long recipe's
    except RecipeError:
        reserve = 0.0
    left = (deadline - time.perf_counter()) / 60 - 1.0 - reserve  # a minute for the final save and evaluation
    if left > 1:
        long_run = out / "long"
        evals = sorted({round(left / 4, 1), round(left / 2, 1), round(left, 1)})
        sets = [f"train.max_minutes={left:.1f}", f"train.eval_at_minutes=[{','.join(map(str, evals))}]",
                f"train.output_dir={long_run}", "logging.trackers=[]"]
        cmd = [sys.executable, "-m", "dspark_train.train", "recipes/smollm2_135m_long.yaml"] + [
            a for s in sets for a in ("--set", s)]
        res["long"] = train(cmd, long_run, out / "long.log", 60 * left + 180)
        print("3. long recipe:", json.dumps(res["long"]), flush=True)

    res["served"] = served(out / "long", args.engine_python, out / "served-eval", args.data_root,
                           max(120.0, deadline - time.perf_counter()))
    print("4. served by vLLM beside ours:", json.dumps(res["served"]), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    ok = res["exactness"]["ok"] and all(res.get(k, {"rc": 0})["rc"] == 0 for k in ("bf16_step", "long")) \
        and (not res["served"]["ran"] or res["served"]["rc"] == 0)
    print(f"gpu-check {'passed' if ok else 'FAILED'}; written {out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
