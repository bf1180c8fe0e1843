"""The drafter's optimizer: AdamW (default), or `train.optimizer: muon`.

Muon (torch.optim.Muon: momentum, then the update orthogonalised by Newton–Schulz) is meant for the 2-D weights of
hidden layers: the attention and MLP projections, the context projection `fc`, the RNN head's map and Medusa's
heads. Everything else stays on AdamW: vectors (norms, biases, the MASK embedding) and the input/output-like
matrices (the Markov head's W1 embedding and W2 output map, the one-output confidence head). Muon's learning
rate is `train.lr` scaled by torch's "match_rms_adamw" rule (0.2·√max(A, B)), so one lr serves both halves and
the same warmup-cosine schedule drives both (the scheduler sets every group's lr).

Checkpoints keep optimizer state by parameter name, as for AdamW (`moment_keys` names a parameter's tensors:
exp_avg / exp_avg_sq, or Muon's momentum_buffer), so a Muon run resumes at another world size too. Muon is
refused under DeepSpeed: ZeRO partitions flattened parameters, and Newton–Schulz needs whole matrices
(DeepSpeed's own Muon is configured in its JSON and keeps its state in its own layout).
"""
from __future__ import annotations

import torch

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MUON_KEYS = ("momentum_buffer",)
ADAMW_ONLY = ("w1.", "w2.", "conf.")  # input/output-like matrices of the heads


def uses_muon(name: str, param: torch.Tensor) -> bool:
    return param.ndim == 2 and not name.startswith(ADAMW_ONLY)


class Composite(torch.optim.Optimizer):
    """Several optimizers stepped as one: what accelerate prepares and the scheduler drives.

    The members own the parameters, groups and state; `param_groups` is a live view of the members' group dicts
    (setting a group's lr reaches the member) and `state_dict` / `load_state_dict` delegate, so a round trip
    (accelerate does one in `prepare`) leaves the view pointing at the members' new groups. Optimizer.__init__ is
    deliberately not called: it would build groups of its own."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.defaults = {}
        self._owner = {p: o for o in optimizers for g in o.param_groups for p in g["params"]}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> "_MergedState":
        return _MergedState(self.optimizers)

    def owner(self, param: torch.Tensor) -> torch.optim.Optimizer:
        return self._owner[param]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"members": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for o, sd in zip(self.optimizers, state_dict["members"], strict=True):
            o.load_state_dict(sd)


class _MergedState:
    """Read access to the members' per-parameter state (what checkpoint gathering uses)."""

    def __init__(self, optimizers):
        self._optimizers = optimizers

    def get(self, param, default=None):
        for o in self._optimizers:
            if param in o.state:
                return o.state[param]
        return default

    def __getitem__(self, param):
        found = self.get(param)
        if found is None:
            raise KeyError(param)
        return found

    def __contains__(self, param) -> bool:
        return any(param in o.state for o in self._optimizers)


def build_optimizer(named: list, train_cfg) -> torch.optim.Optimizer:
    """AdamW over `named` (trainable (name, parameter) pairs), or Muon + AdamW split by `uses_muon`."""
    adamw = dict(lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW([p for _, p in named], **adamw)
    hidden = [p for n, p in named if uses_muon(n, p)]
    rest = [p for n, p in named if not uses_muon(n, p)]
    parts = [torch.optim.Muon(hidden, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                              adjust_lr_fn="match_rms_adamw")] if hidden else []
    parts += [torch.optim.AdamW(rest, **adamw)] if rest else []
    return Composite(parts)


def moment_keys(opt: torch.optim.Optimizer, param: torch.Tensor) -> tuple[str, ...]:
    """The state tensors a parameter carries in `opt`, by the names its checkpoint uses."""
    owner = opt.owner(param) if isinstance(opt, Composite) else opt
    return MUON_KEYS if isinstance(owner, torch.optim.Muon) else ADAM_KEYS


@torch.no_grad()
def set_moments(opt: torch.optim.Optimizer, named: list, moments: dict, step: int, where: str) -> None:
    """Put saved state back by parameter name (the plain, non-DeepSpeed path)."""
    for name, p in named:
        owner = opt.owner(p) if isinstance(opt, Composite) else opt
        keys = moment_keys(opt, p)
        missing = [k for k in keys if f"{name}.{k}" not in moments]
        if missing:
            raise ValueError(f"{where}: no optimizer state {name}.{missing[0]} (was train.optimizer changed?)")
        state = {k: moments[f"{name}.{k}"].to(p) for k in keys}
        if keys == ADAM_KEYS:
            state["step"] = torch.tensor(float(step))
        owner.state[p] = state
