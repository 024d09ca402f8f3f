"""The training progress bar: one tqdm bar over optimizer steps on the main process."""

from __future__ import annotations

from tqdm.auto import tqdm
from transformers import TrainerCallback


class RunProgress(TrainerCallback):
    """A tqdm bar over optimizer steps with the latest reward / accuracy / validation mean."""

    def __init__(self) -> None:
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="train", unit="step"
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, label in (("reward/mean", "reward"), ("accuracy", "acc"), ("val/mean", "val")):
            if logs.get(key) is not None:
                self.postfix[label] = f"{logs[key]:.3f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
