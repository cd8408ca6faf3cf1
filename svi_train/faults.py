"""Non-finite losses: the step is skipped on every rank together, and too many in a row stop the run."""

from __future__ import annotations

import lightning as L
import torch


class NonFiniteGuard:
    """Counts the non-finite steps (in a row and in all) of one run."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = self.total = 0

    def any_rank(self, module: L.LightningModule, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is non-finite on any rank; a step finite on every rank ends a run of skips."""
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=module.device)
        if module.trainer.world_size > 1:
            bad = module.all_gather(bad).max()  # every rank skips together, or DDP would wait forever
        if bool(bad.max()):
            return True
        self.in_row = 0
        return False

    def skip(self, module: L.LightningModule, loss: torch.Tensor) -> torch.Tensor | None:
        """No backward, no optimizer step, no bank update; too many in a row stop the run."""
        self.in_row += 1
        self.total += 1
        module.log("train/nonfinite_steps", float(self.total))
        if self.in_row >= self.max_in_row:
            last = getattr(module.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise FloatingPointError(
                f"{self.in_row} non-finite losses in a row (last {float(loss)}) at step {module.global_step}; "
                f"the last good checkpoint is {last}: resume from it with a lower optim.lr, or check the data"
            )
        if module.trainer.world_size > 1:  # Lightning cannot skip a step on several ranks: make it a no-op
            hold_optimizer(module.optimizers())
            return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0
        return None


def hold_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Every rank must still run the step (its collectives), so it must change nothing: lr 0 leaves the
    weights as they are (AdamW scales its weight decay by lr too), and right after the update the moments,
    step counts and lr are put back. Works under DeepSpeed's and Lightning's optimizer wrappers."""
    base = optimizer
    while hasattr(base, "optimizer"):
        base = base.optimizer
    saved = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in base.state.items()}
    lrs = [group["lr"] for group in base.param_groups]
    for group in base.param_groups:
        group["lr"] = 0.0

    def put_back(optimizer, args, kwargs) -> None:
        handle.remove()
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        for param in list(optimizer.state):
            if param not in saved:  # state the held step created (on the first step)
                del optimizer.state[param]
        for param, state in saved.items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    optimizer.state[param][key].copy_(value)
                else:
                    optimizer.state[param][key] = value

    handle = base.register_step_post_hook(put_back)
