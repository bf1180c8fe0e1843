"""Lossless speculative decoding against a frozen target: chain, tree and scheduled verification.

    dec = SpeculativeDecoder(target, drafter, calibration=None, tree=None, conf_threshold=0.0,
                             exact_attention=False)
    trace = dec.generate(prompt_ids, max_new_tokens=128, mode="chain" | "tree" | "adaptive",
                         temperature=0.0, top_p=1.0, top_k=0, eos_token_id=None, stop_strings=(),
                         seed=None, generator=None, policy=None, record_probs=False)
    trace.tokens, trace.tau, trace.rounds[i]  (RoundTrace: per node tokens/parents/depths/conf_logits/
                                               draft_probs/accepted, n_accepted, committed, widths, timings)
    batch = dec.generate_batch(prompts, max_new_tokens, ..., sps=load_or_measure_sps(target))  # Algorithm 1
    dec.adaptive_policy(), dec.adaptive_info   # calibration.json's policy, re-tuned under another machine key

    trace = dec.generate(prompt_ids, mode="hybrid")  # or hybrid=True with any mode: + copy branches

`SpeculativeDecoder(target)` without a drafter is plain target decoding through the same loop (with
hybrid=True: copy drafting alone).
Modules: sampling (warping, residuals), tree (TreePolicy, drafting, mask, acceptance), cache (KV crop and
compaction), scheduler (SPS profile per machine key, Algorithm 1), retune (the adaptive policy for this
machine), attention (row-exact bf16 verification), copy (the copy drafter: incremental n-gram index,
calibrated estimates), hybrid (drafter + copy trees), decoder (loop).
"""
from .copy_drafter import CopyConfig, CopyDrafter, CopyIndex, CopyPrior, fit_copy_prior
from .decoder import BatchTrace, DecodeTrace, RoundTrace, SpeculativeDecoder, find_stop
from .retune import policy_for_machine
from .sampling import SamplingParams, accept_rate, residual, sample_without_replacement, warp
from .scheduler import (BatchSPS, LoadAwareScheduler, SPSProfile, cost_profile, load_or_measure_sps, machine_key,
                        measure_sps, prefix_schedule, smooth_sps)
from .hybrid import HybridDrafting, HybridPolicy, merge_copy
from .tree import COPY, DRAFTER, DraftTree, TreePolicy, accept_greedy, accept_sampling, draft_tree, tree_mask

__all__ = ["SpeculativeDecoder", "DecodeTrace", "RoundTrace", "BatchTrace", "find_stop", "SamplingParams", "warp",
           "residual", "accept_rate", "sample_without_replacement", "SPSProfile", "prefix_schedule", "measure_sps",
           "load_or_measure_sps", "BatchSPS", "LoadAwareScheduler", "cost_profile", "machine_key", "smooth_sps",
           "policy_for_machine", "TreePolicy", "DraftTree", "draft_tree", "tree_mask", "accept_greedy",
           "accept_sampling", "DRAFTER", "COPY",
           "CopyConfig", "CopyDrafter", "CopyIndex", "CopyPrior", "fit_copy_prior", "HybridDrafting", "HybridPolicy",
           "merge_copy"]
