"""The speculative decoding loop: prefill, then rounds of draft → verify (one target forward) → commit.

Round invariants (batch 1): the target KV cache holds exactly the committed context *before* the anchor
(the last committed token); the drafter's context holds the same positions. A round verifies
[anchor, draft nodes] with position ids ctx + depth and a tree mask, keeps the accepted path's KV
(crop or compaction) and hands the drafter the features of exactly those positions. With no drafter the
same loop is plain target decoding (one token per round), the reference the tests compare against.
`hybrid=True` (or mode "hybrid") adds the copy drafter's branches to each round's tree (hybrid.py).
Each round records its time by phase (RoundTrace.t_*), read at the loop's own boundaries (bench/bench_round.py).
Several requests per forward (`generate_batch`): batch.py, with this loop's setup, acceptance and trace types.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from copy import copy as shallow_copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from transformers import DynamicCache

from ..config import MODES
from ..policy.calibration import read_calibration
from .attention import row_exact, use_row_exact_attention
from .batch import BatchTrace, decode_batch
from .cache import keep_slots
from .copy_drafter import CopyDrafter, prior_from_calibration
from .hybrid import HybridDrafting, HybridPolicy
from .record import PassRecord
from .rules import RepetitionPenalty, repetition_penalty
from .sampling import SamplingParams, accept_rate, sample, warp
from .retune import policy_for_machine
from .scheduler import LoadAwareScheduler, SPSProfile, load_or_measure_sps, machine_key, smooth_sps
from .tree import COPY, DRAFTER, DraftTree, TreePolicy, accept_greedy, accept_sampling, draft_tree, tree_mask

SOURCE_NAMES = {DRAFTER: "drafter", COPY: "copy", DRAFTER | COPY: "both"}


@dataclass
class RoundTrace:
    """One round. Node lists exclude the anchor; `parents` index nodes with 0 = the anchor, 1.. = these nodes.

    accepted[i]: node i+1 lies on the accepted path (chain: the per-position survival flags).
    conf_logits[i]: the drafter's raw (pre-sigmoid) confidence for node i+1's slot given its parent.
    draft_probs[i]: probability of the token under the (warped) draft distribution it was drawn from.
    target_probs / accept_rates (record_probs=True): p_t(token | path to parent) and Σ_v min(p_t, p_d) at the
    parent (the exact acceptance probability of a first sibling, the soft label c*).
    sources[i]: who proposed node i+1: "drafter", "copy" or "both" (hybrid rounds share equal nodes).
    """

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    conf_logits: list[float]
    draft_probs: list[float]
    accepted: list[bool]
    n_accepted: int  # draft tokens accepted; the round commits n_accepted + 1 (the bonus) unless stopped
    committed: int  # tokens actually appended
    widths: list[int]  # nodes per depth
    t_draft: float = 0.0  # drafting: the tree (backbone, head steps, building, copy), mask, context extension
    t_verify: float = 0.0  # target forward + LM head
    t_book: float = 0.0  # acceptance, KV compaction, trace and stop checks
    target_probs: Optional[list[float]] = None
    accept_rates: Optional[list[float]] = None
    sources: list[str] = field(default_factory=list)
    drafter_skipped: bool = False  # hybrid: a confident copy match made the drafter's forward unnecessary
    t_copy: float = 0.0  # hybrid: copy drafting (query, merge, budget, index update), part of t_draft
    # the phases inside those (seconds; what is left of t_draft is tree building, of t_book trace and stop checks)
    t_propose: float = 0.0  # drafter backbone pass, part of t_draft
    t_head_steps: float = 0.0  # drafter sequential head steps, part of t_draft
    t_mask: float = 0.0  # tree attention mask and position ids, part of t_draft
    t_extend: float = 0.0  # drafter context extension with the committed positions, part of t_draft
    t_lm_head: float = 0.0  # target LM head, part of t_verify
    t_accept: float = 0.0  # acceptance, part of t_book
    t_kv: float = 0.0  # KV cache compaction to the accepted path, part of t_book

    def by_source(self) -> dict[str, list[int]]:
        """{source: [verified nodes, accepted nodes]} (hybrid rounds)."""
        out: dict[str, list[int]] = {}
        for s, ok in zip(self.sources, self.accepted):
            e = out.setdefault(s, [0, 0])
            e[0], e[1] = e[0] + 1, e[1] + ok
        return out

    @property
    def verified(self) -> int:
        return len(self.tokens)


@dataclass
class DecodeTrace:
    """Output of one `generate` call: generated ids (prompt excluded) and per-round statistics."""

    tokens: list[int]
    prompt_len: int
    stop_reason: str  # "eos" | "stop_string" | "max_new_tokens"
    rounds: list[RoundTrace] = field(default_factory=list)
    t_prefill: float = 0.0
    t_total: float = 0.0
    record: Optional[PassRecord] = field(default=None, repr=False)  # generate(record=True): the lossless check's

    @property
    def tau(self) -> float:
        """Mean accepted drafts + 1 (the bonus) per verify forward; a round cut short by a stop still counts
        what it accepted (its `committed` says what was kept)."""
        return sum(r.n_accepted + 1 for r in self.rounds) / max(1, len(self.rounds))

    def to_dict(self) -> dict:
        return {**asdict(replace(self, record=None)), "tau": self.tau}


def find_stop(tokens: list[int], start: int, max_new: int, eos: set, stop_strings: Sequence[str], tokenizer
              ) -> tuple[Optional[int], str]:
    """First index ≥ start at which generation ends: (number of tokens to keep, reason) or (None, "")."""
    window = max((len(s.encode()) for s in stop_strings), default=0) + 4
    for i in range(start, len(tokens)):
        if tokens[i] in eos:
            return i + 1, "eos"
        if stop_strings:
            text = tokenizer.decode(tokens[max(0, i + 1 - window):i + 1])
            if any(s in text for s in stop_strings):
                return i + 1, "stop_string"
        if i + 1 >= max_new:
            return i + 1, "max_new_tokens"
    return None, ""


class SpeculativeDecoder:
    """Lossless speculative decoding of a FrozenTarget with a Drafter (None = plain target decoding).

    Modes: "chain" (γ = drafter.config.block_size tokens, optional confidence threshold), "tree" (fixed
    widths), "adaptive" (TreePolicy from a calibration.json, re-tuned on first use where its cost profile was
    measured under another machine key: decoding/retune.py; retune=False takes it as is). `policy=` overrides
    a mode's default; a policy with node budget 0 is plain decoding (the drafter does not run).
    `hybrid=True` merges the copy drafter's continuations into any mode's tree (decoding/hybrid.py); mode
    "hybrid" is adaptive (tree without a calibration) with hybrid=True. `copy` / `hybrid` / `sps` override
    the copy drafter (default: calibration.json's `copy` prior), the hybrid policy and the verify-cost
    curve that sizes hybrid trees (default: calibration.json's cost profile when it was measured under this
    machine key, else measured here once and cached).
    exact_attention=True verifies with row-exact attention (decoding/attention.py) in every target layer: greedy
    output then equals plain greedy bit for bit where the other kernels act on each row alone (bf16 on CPUs), at
    some verify cost; an int n does so in the first n layers only (the eval's lossless check uses 1: the cache
    entering layer 1 is then plain decoding's, bit for bit); `exact_projections` computes those layers'
    key/value projections row by row too (where matmuls depend on the number of rows, as fp32 ones do on MKL:
    their cache is then a one-token step's). Greedy and sampled outputs follow the target's generation_config
    repetition_penalty as plain `generate` does (decoding/rules.py).
    """

    def __init__(self, target, drafter=None, calibration: Union[str, Path, dict, None] = None,
                 tree: Optional[TreePolicy] = None, conf_threshold: float = 0.0,
                 exact_attention: Union[bool, int] = False, exact_projections: bool = False, retune: bool = True,
                 copy: Optional[CopyDrafter] = None, hybrid: Optional[HybridPolicy] = None,
                 sps: Optional[SPSProfile] = None):
        self.target = target
        self._set_exact(exact_attention, exact_projections)
        self.drafter = drafter
        gamma = drafter.config.block_size if drafter is not None else 0
        self.gamma = gamma
        if calibration is not None:
            calibration = read_calibration(calibration)
        calibrated = TreePolicy.from_calibration(calibration, gamma) if calibration is not None else None
        maps = calibrated.maps if calibrated is not None else None
        self.policies = {
            "chain": TreePolicy.chain(gamma, conf_threshold, maps),
            # an autoregressive drafter (EAGLE-3) pays per depth, not per node: greedy reranks its beam tree (EAGLE-2)
            "tree": tree or TreePolicy([3] + [2] * (gamma - 1), beam=4, node_budget=16, maps=maps,
                                       rerank=drafter is not None and drafter.config.kind == "eagle3"),
        }
        self.calibration, self.retune = calibration, retune
        self.adaptive_info: Optional[dict] = None  # where the adaptive policy came from (adaptive_policy())
        self.copy = copy or CopyDrafter(prior=prior_from_calibration(calibration))
        self.hybrid = hybrid or HybridPolicy()
        cost = (calibration or {}).get("cost_profile") or {}
        # a curve measured under another machine key says nothing about this one (bf16 vs fp32 on a CPU: 3x)
        here = cost.get("tokens") and cost.get("machine") == machine_key(target)
        self.sps = sps or (SPSProfile(cost["tokens"], cost["steps_per_s"]) if here else None)
        self.device = target.device
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    def adaptive_policy(self) -> TreePolicy:
        """The adaptive policy for this machine, resolved on first use (`adaptive_info` records its source):
        calibration.json's own under the machine key it was tuned for, else re-tuned here
        (retune.policy_for_machine)."""
        if "adaptive" not in self.policies:
            if self.calibration is None or self.drafter is None:
                raise ValueError("mode 'adaptive' needs a calibration (SpeculativeDecoder(..., calibration=...))")
            if self.retune:
                self.policies["adaptive"], self.adaptive_info = policy_for_machine(
                    self.target, self.drafter, self.calibration, generate=self.generate)
            else:
                self.policies["adaptive"] = TreePolicy.from_calibration(self.calibration, self.gamma)
                self.adaptive_info = {"source": "calibration.json", "why": "retune=False"}
        return self.policies["adaptive"]

    def hybrid_base(self) -> str:
        """The mode whose drafter trees mode "hybrid" adds copy branches to: adaptive when there is a calibrated
        drafter, else tree (without a drafter: copy drafting alone)."""
        return "adaptive" if self.calibration is not None and self.drafter is not None else "tree"

    def policy(self, mode: str) -> TreePolicy:
        """The policy a mode drafts with (hybrid: its base mode's; adaptive: resolved for this machine)."""
        if mode == "hybrid":
            mode = self.hybrid_base()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return self.adaptive_policy() if mode == "adaptive" else self.policies[mode]

    def with_exact_attention(self, exact_attention: Union[bool, int], exact_projections: bool = False
                             ) -> "SpeculativeDecoder":
        """This decoder (its target, drafter, policies, copy drafter and cost curve shared) verifying with
        row-exact attention in other layers (see the class docstring)."""
        other = shallow_copy(self)
        other._set_exact(exact_attention, exact_projections)
        return other

    def _set_exact(self, exact_attention: Union[bool, int], exact_projections: bool) -> None:
        self.exact_layers = self.target.num_layers if exact_attention is True else int(exact_attention)
        self.exact_projections = exact_projections
        if self.exact_layers:
            use_row_exact_attention(self.target.model)

    # ------------------------------------------------------------------ helpers
    def _setup(self, mode, policy, temperature, top_p, top_k, eos_token_id, seed, generator, max_new_tokens):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        if policy is None:
            policy = self.policy(mode)
        params = SamplingParams(temperature, top_p, top_k)
        if eos_token_id is None:
            eos_token_id = self.target.model.generation_config.eos_token_id
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        if generator is None and not params.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return policy, params, eos, generator

    def _first_token(self, logits: torch.Tensor, params: SamplingParams, generator) -> int:
        return int(logits.argmax()) if params.greedy else sample(warp(logits, params), generator)

    def cost_curve(self) -> SPSProfile:
        """SPS(B) that sizes hybrid trees: given, calibration.json's under this machine key, else measured here
        (cached per machine key) and smoothed to be non-increasing, as calibration.json's is."""
        if self.sps is None:
            measured = load_or_measure_sps(self.target)
            self.sps = SPSProfile(measured.tokens, smooth_sps(measured.steps_per_s), measured.meta)
        return self.sps

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    # ------------------------------------------------------------------ batch size 1
    def _exact(self):
        """Row-exact verification in the first `exact_layers` layers for one verify forward (a prefill stays
        stock, as plain decoding's)."""
        return row_exact(self.target.model, self.exact_layers, self.exact_projections) if self.exact_layers \
            else nullcontext()

    def _penalty(self, repetition: Optional[float], context: torch.Tensor) -> Optional[RepetitionPenalty]:
        p = repetition_penalty(self.target.model.generation_config) if repetition is None else repetition
        return RepetitionPenalty(p, context, self.target.vocab_size) if p != 1.0 else None

    @torch.no_grad()
    def generate(self, prompt_ids: Union[Sequence[int], torch.Tensor], max_new_tokens: int = 128,
                 mode: str = "chain", temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 eos_token_id: Union[int, list[int], None] = None, stop_strings: Sequence[str] = (),
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 policy: Optional[TreePolicy] = None, record_probs: bool = False, hybrid: bool = False,
                 repetition_penalty: Optional[float] = None, record: bool = False) -> DecodeTrace:
        """Generate up to `max_new_tokens` ids after `prompt_ids`. eos_token_id None = the target's
        generation_config (pass [] for none), repetition_penalty None = the generation_config's (1.0: none).
        Greedy output equals plain greedy decoding; sampled output is distributed exactly as the target's (same
        temperature/top-p/top-k). `record=True` leaves trace.record (decoding/record.py) for the lossless check.
        A prompt that does not fit the target's window with `max_new_tokens` more raises target.PromptTooLong (a
        ValueError) up front."""
        policy, params, eos, gen = self._setup(mode, policy, temperature, top_p, top_k, eos_token_id, seed,
                                               generator, max_new_tokens)
        hybrid = hybrid or mode == "hybrid"
        tgt, dev = self.target, self.device
        drafter = self.drafter if policy.node_budget > 0 else None  # budget 0: plain decoding, no drafting
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1).to(dev)
        tgt.check_fits(prompt.shape[1], max_new_tokens)  # PromptTooLong: refused before any forward
        penalty = self._penalty(repetition_penalty, prompt[0])
        t_start = self._now()
        cache = DynamicCache(config=tgt.config)
        out = tgt.forward_features(prompt, cache=cache)
        state = None
        if drafter is not None:
            state = drafter.init_state(batch_size=1)
            drafter.extend_context(state, out.features, out.last_hidden, prompt)
        first = tgt.logits(out.last_hidden[0, -1])
        if penalty is not None:
            first = penalty.apply(first)
        rows = [PassRecord.rows(first[None])] if record else None  # the row that chose each emitted token
        tokens = [self._first_token(first, params, gen)]
        if penalty is not None:
            penalty.commit(tokens)
        trace = DecodeTrace(tokens, prompt.shape[1], "", t_prefill=self._now() - t_start)
        ctx = prompt.shape[1]
        end, trace.stop_reason = find_stop(tokens, 0, max_new_tokens, eos, stop_strings, tgt.tokenizer)
        hyb = HybridDrafting(self.copy, self.hybrid, self.cost_curve(), prompt[0].tolist() + tokens) if hybrid \
            and end is None else None
        while end is None:
            t0 = self._now()
            room = max_new_tokens - len(tokens) - 1
            if hyb is not None:
                tree = hyb.draft(drafter, state, tokens[-1], policy, params, room, gen, record_probs, self._now)
            elif drafter is not None:
                tree = draft_tree(drafter, state, tokens[-1], policy, params, room, gen, record_probs, self._now)
            else:
                tree = DraftTree([tokens[-1]])
            t_tree = self._now()
            mask = tree_mask(tree.parents, ctx, dev)
            pos = torch.tensor(tree.depths, device=dev)[None] + ctx
            t1 = self._now()
            with self._exact():
                out = tgt.forward_features(torch.tensor([tree.tokens], device=dev), attention_mask=mask,
                                           position_ids=pos, cache=cache)
            t_fwd = self._now()
            logits = tgt.logits(out.last_hidden[0])
            t2 = self._now()
            if penalty is not None:
                logits = penalty.apply(logits, tree.tokens, tree.parents)
            path, bonus, probs = self._accept(tree, logits, params, gen, record_probs)
            if record:
                rows.append(PassRecord.rows(logits[path]))
            t_acc = self._now()
            keep_slots(cache, ctx, path)
            t_kv = self._now()
            ctx += len(path)
            start = len(tokens)
            tokens += [tree.tokens[i] for i in path[1:]] + [bonus]
            if penalty is not None:
                penalty.commit(tokens[start:])
            end, trace.stop_reason = find_stop(tokens, start, max_new_tokens, eos, stop_strings, tgt.tokenizer)
            rnd = self._round(tree, path, probs if record_probs else None)
            rnd.committed = (end or len(tokens)) - start
            t3 = self._now()
            if end is None and drafter is not None:  # also after rounds that skipped the drafter
                drafter.extend_context(state, out.features[:, path], out.last_hidden[:, path],
                                       torch.tensor([[tree.tokens[i] for i in path]], device=dev))
            t_ext = self._now()
            if end is None and hyb is not None:
                hyb.commit(tree, path, tokens[start:])
            t4 = self._now()
            rnd.t_draft, rnd.t_verify, rnd.t_book = (t1 - t0) + (t4 - t3), t2 - t1, t3 - t2
            rnd.t_propose, rnd.t_head_steps, rnd.t_mask, rnd.t_extend = (tree.t_propose, tree.t_head_steps,
                                                                         t1 - t_tree, t_ext - t3)
            rnd.t_lm_head, rnd.t_accept, rnd.t_kv = t2 - t_fwd, t_acc - t2, t_kv - t_acc
            if hyb is not None:
                rnd.drafter_skipped, rnd.t_copy = hyb.skipped and drafter is not None, hyb.t_copy
            trace.rounds.append(rnd)
        del tokens[end:]
        if record:
            trace.record = PassRecord.build(rows, cache, ctx, len(tokens))
        trace.t_total = self._now() - t_start
        return trace

    @staticmethod
    def _accept(tree: DraftTree, logits: torch.Tensor, params: SamplingParams, gen, record_probs: bool):
        """Acceptance over the tree's verified logits [N, V] -> (path, bonus, warped target probs or None)."""
        probs = None if params.greedy and not record_probs else warp(logits, params)
        if params.greedy:
            path, bonus = accept_greedy(tree, logits)
        else:
            path, bonus = accept_sampling(tree, probs, gen)
        return path, bonus, probs

    @staticmethod
    def _round(tree: DraftTree, path: list[int], probs: Optional[torch.Tensor]) -> RoundTrace:
        on_path = set(path)
        n = len(tree)
        rnd = RoundTrace(tree.tokens[1:], tree.parents[1:], tree.depths[1:], tree.conf_logits[1:],
                         tree.draft_probs[1:], [i in on_path for i in range(1, n)], len(path) - 1, 0,
                         tree.widths(), sources=[SOURCE_NAMES[s] for s in tree.sources[1:]])
        if probs is not None:
            par = torch.tensor(tree.parents[1:], dtype=torch.long, device=probs.device)
            tok = torch.tensor(tree.tokens[1:], dtype=torch.long, device=probs.device)
            rnd.target_probs = probs[par, tok].tolist()
            rates = {u: float(accept_rate(probs[u], q)) for u, q in tree.child_dist.items()}
            rnd.accept_rates = [rates.get(p, float("nan")) if s & DRAFTER else float("nan")  # copy: δ, no rate
                                for p, s in zip(tree.parents[1:], tree.sources[1:])]
        return rnd

    # ------------------------------------------------------------------ several requests per forward
    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       eos_token_id: Union[int, list[int], None] = None, stop_strings: Sequence[str] = (),
                       seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                       sps: Optional[SPSProfile] = None, early_stop: bool = True,
                       conf_threshold: Optional[float] = None, scheduler: Optional[LoadAwareScheduler] = None,
                       repetition_penalty: Optional[float] = None) -> BatchTrace:
        """Chain drafting for R requests with one drafter pass and one target forward per round (decoding/batch.py).

        Lengths come from the load-aware prefix scheduler (Algorithm 1 over calibrated survival, charged the
        measured drafting cost, and skipping the drafter where it does not pay for R requests: scheduler.py) when
        `sps` (or a `scheduler`) is given, else from `conf_threshold` (stop at the first calibrated survival below
        it), else the full chain. Without a drafter it is batched plain decoding. Each request stops where its
        batch-1 decode would (eos, stop strings, max_new_tokens).
        `early_stop=False` (the retrospective scheduler) is for greedy decoding only: under sampling it biases
        the output (scheduler.py, paper Appendix A), so it is refused when temperature > 0.
        """
        if not early_stop and temperature > 0:
            raise ValueError(f"generate_batch: early_stop=False with temperature={temperature}: the retrospective "
                             "scheduler picks lengths after seeing the drafts, which biases sampled output "
                             "(paper, Appendix A); use early_stop=True, or temperature=0")
        return decode_batch(self, prompts, max_new_tokens, temperature, top_p, top_k, eos_token_id, stop_strings,
                            seed, generator, sps, early_stop, conf_threshold, scheduler, DecodeTrace, find_stop,
                            repetition_penalty)
