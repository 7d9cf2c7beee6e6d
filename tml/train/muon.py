"""Muon for the network's hidden weight matrices, AdamW for everything else (train.optimizer: muon).

This is Moonlight's recipe (Liu et al. 2025, "Muon is Scalable for LLM Training", trained there on DeepSeek-V3's MLA
architecture). Muon replaces each matrix's update by the nearest semi-orthogonal matrix to its momentum (a few
Newton-Schulz iterations), so that every direction of the matrix moves at the same rate. That only means something
for a weight matrix inside the network: the token embedding, an untied LM head, biases and norm gains keep AdamW,
as in every Muon recipe. torch's `adjust_lr_fn="match_rms_adamw"` scales Muon's update to AdamW's typical RMS
(0.2 * sqrt(max(rows, cols))), so Muon reuses the lr and weight decay tuned for AdamW (train.muon_lr overrides).

torch.optim.Muon (torch >= 2.9) and torch.optim.AdamW do the arithmetic. MuonWithAdamW is one torch Optimizer over
both sets of parameter groups, so nothing else in the loop changes: LambdaLR scales every group's lr by the schedule,
Fabric's GradScaler unscales (and clipping clips) every gradient, and one state dict saves and restores both. Muon
needs whole matrices, so ZeRO, which hands the optimizer flat shards, is refused (tml/train/config.py). A global
optimizer step hook (torch.optim.optimizer.register_optimizer_step_pre_hook) sees three steps per step: this
optimizer's and each inner one's; hooks registered on this optimizer see one.

torch runs Muon's Newton-Schulz iterations in bf16 whatever the training precision: cheap on a GPU, slow on a CPU
without native bf16 (the start-up says so), and the reason two runs whose gradients differ in the last fp32 bit (DDP's
other summation order, torch.compile's fused kernels) drift apart faster under Muon than under AdamW.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

MUON = "muon"
ADAMW = "adamw"


def muon_unavailable() -> str | None:
    """Why this torch cannot run Muon with AdamW-matched updates (None when it can)."""
    muon = getattr(torch.optim, "Muon", None)
    if muon is None or "adjust_lr_fn" not in inspect.signature(muon).parameters:
        return f"needs torch.optim.Muon with adjust_lr_fn (torch >= 2.9); this is torch {torch.__version__}"
    return None


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer whose param_groups are Muon's groups followed by AdamW's; each group says which in "algorithm".

    The inner optimizers work on the very group dicts and state of this one (the groups are shared objects, the state
    one dict keyed by parameter), so a scheduler or scaler that changes a group's lr or reads its gradients reaches
    the optimizer that steps it, and the state dict is torch's ordinary one.
    """

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], *, lr: float,
                 muon_lr: float, momentum: float, betas: tuple[float, float]) -> None:
        reason = muon_unavailable()
        if reason:
            raise RuntimeError(f"train.optimizer='muon' {reason}")
        self._muon = torch.optim.Muon(muon_groups, lr=muon_lr, momentum=momentum, adjust_lr_fn="match_rms_adamw")
        self._adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas)
        for algorithm, optimizer in ((MUON, self._muon), (ADAMW, self._adamw)):
            for group in optimizer.param_groups:
                group["algorithm"] = algorithm
        super().__init__(self._muon.param_groups + self._adamw.param_groups, defaults={})
        self._share_groups_and_state()
        self._built = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group added after construction names its algorithm ("muon" or "adamw"); that optimizer fills in its
        defaults and steps it."""
        # False while torch's __init__ adds the groups the inner two already hold
        built = getattr(self, "_built", False)
        if built:
            inner = {MUON: self._muon, ADAMW: self._adamw}.get(param_group.get("algorithm"))
            if inner is None:
                raise ValueError(f"a group added to MuonWithAdamW needs 'algorithm': {MUON!r} or {ADAMW!r}, got "
                                 f"{param_group.get('algorithm')!r}")
            inner.add_param_group(param_group)  # the same dict, given that optimizer's defaults
        super().add_param_group(param_group)
        if built:
            self._share_groups_and_state()

    def __getstate__(self) -> dict[str, Any]:  # torch's keeps only defaults, state and groups: keep the inner two
        return {**super().__getstate__(), "_muon": self._muon, "_adamw": self._adamw, "_built": True}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._share_groups_and_state()  # a copy's inner optimizers step the copy's groups and state

    def _share_groups_and_state(self) -> None:
        """Point the inner optimizers at this one's groups and state (again after load_state_dict replaced them)."""
        self._muon.param_groups = [group for group in self.param_groups if group["algorithm"] == MUON]
        self._adamw.param_groups = [group for group in self.param_groups if group["algorithm"] == ADAMW]
        self._muon.state = self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [group.get("algorithm") for group in state_dict["param_groups"]]
        ours = [group["algorithm"] for group in self.param_groups]
        if saved != ours:  # torch checks only the group sizes; a group of the other algorithm would load silently
            raise ValueError(f"the saved optimizer's groups are {saved}, this one's {ours}: not a state of this "
                             "Muon + AdamW optimizer")
        super().load_state_dict(state_dict)
        self._share_groups_and_state()

    def describe(self) -> str:
        """One start-up line: which tensors each algorithm steps, so the split is visible, not only documented."""
        def count(algorithm: str) -> tuple[int, int]:
            tensors = [p for group in self.param_groups if group["algorithm"] == algorithm for p in group["params"]]
            return len(tensors), sum(p.numel() for p in tensors)

        (muon_tensors, muon_params), (adamw_tensors, adamw_params) = count(MUON), count(ADAMW)
        return (f"optimizer: Muon on {muon_tensors} hidden matrices ({muon_params:,} parameters), AdamW on the other "
                f"{adamw_tensors} tensors ({adamw_params:,} parameters)")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        self._adamw.step()
        return loss
