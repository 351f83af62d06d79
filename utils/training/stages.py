"""The official two-stage rule: when to remember, restore, switch stage and stop."""

from __future__ import annotations

from dataclasses import dataclass


# Stage logic
# ------------------------------------------------------------------------------------------------


@dataclass
class Decision:
    """What to do after one epoch's validation."""
    epoch: int
    stage: int             # the stage the epoch was trained in
    value: float           # the figure that stage selects on (pixel AP, then image AP)
    improved: bool         # remember the parameters (and write best.pth)
    patience: int
    restore: bool = False  # load the remembered parameters of ``stage``
    switch: bool = False   # start stage 2 (new optimiser)
    stop: bool = False     # training ends


class StageController:
    """The official two-stage rule, free of tensors and files.

    A counter ``patience`` starts at 0 and the best figure of each stage at 0. Stage 1 selects
    on pixel AP: a value >= the best so far is an improvement (remember the parameters, reset
    the counter). Otherwise, if the counter already equals ``patience`` (3), the remembered
    parameters are restored and stage 2 starts; in either case the counter then goes up by
    one. The switch therefore comes at the (patience + 1)-th consecutive epoch without
    improvement (the 4th with the official 3). Stage 2 does the same with image AP, its best
    starting again at 0 (so its first epoch always improves and resets the counter), and
    stops instead of switching, keeping the current parameters (no restore). NaN (no class
    could be scored) never improves."""

    def __init__(self, patience: int = 3):
        self.patience_limit = int(patience)
        self.stage = 1
        self.patience = 0
        self.best = {1: 0.0, 2: 0.0}
        self.best_epoch: dict[int, int | None] = {1: None, 2: None}
        self.switch_epoch: int | None = None
        self.finished = False

    def update(self, epoch: int, pixel_ap: float, image_ap: float) -> Decision:
        if self.finished:
            raise RuntimeError("training has already stopped")
        stage = self.stage
        value = float(pixel_ap if stage == 1 else image_ap)
        improved = value >= self.best[stage]          # False for NaN
        decision = Decision(epoch, stage, value, improved, self.patience)
        if improved:
            self.best[stage] = value
            self.best_epoch[stage] = epoch
            self.patience = 0
        else:
            if self.patience == self.patience_limit:
                if stage == 1:
                    decision.restore = decision.switch = True
                    self.stage = 2
                    self.switch_epoch = epoch
                else:
                    decision.stop = True
                    self.finished = True
            self.patience += 1
        decision.patience = self.patience
        return decision

    def state_dict(self) -> dict:
        return {"patience_limit": self.patience_limit, "stage": self.stage,
                "patience": self.patience, "best": dict(self.best),
                "best_epoch": dict(self.best_epoch), "switch_epoch": self.switch_epoch,
                "finished": self.finished}

    def load_state_dict(self, state: dict) -> None:
        self.patience_limit = int(state["patience_limit"])
        self.stage = int(state["stage"])
        self.patience = int(state["patience"])
        self.best = {int(k): float(v) for k, v in state["best"].items()}
        self.best_epoch = {int(k): v for k, v in state["best_epoch"].items()}
        self.switch_epoch = state["switch_epoch"]
        self.finished = bool(state["finished"])


# ------------------------------------------------------------------------------------------------
