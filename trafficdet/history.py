"""The training log: each finished epoch once in dvclive, also across a killed and resumed run."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from trafficdet.io import read_json, write_json

LOSSES = ("total_loss", "cls_loss", "box_loss", "model_loss")


def make_history_callback(live_dir: Path, timing_dir: Path, history_file: Path, train_images: int) -> Any:
    """A Keras callback that logs each epoch once to dvclive: losses and learning rate in
    ``live_dir``, seconds and images/s (measurements, not a function of the inputs) in ``timing_dir``.

    The history of finished epochs is kept beside the BackupAndRestore backup. On
    (re)start, Keras tells the first epoch it will run; the history is cut to the epochs
    before it and replayed into a fresh dvclive directory, so an epoch that ran but was
    not backed up before a kill is logged once, not twice.
    """
    import tensorflow as tf
    from dvclive import Live

    class EpochHistory(tf.keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.live: Live | None = None
            self.timing: Live | None = None
            self.history: list[dict[str, float]] = read_json(history_file) if history_file.exists() else []
            self.started = self.validation_started = 0.0
            self.steps = 0  # batches this process ran in the current epoch: the same on every worker

        def _learning_rate(self) -> float:
            optimizer = self.model.optimizer
            rate = optimizer.learning_rate
            value = rate(optimizer.iterations) if callable(rate) else rate
            return float(tf.keras.backend.get_value(value))  # also a MirroredVariable, under a strategy

        def on_test_begin(self, logs: dict | None = None) -> None:
            self.validation_started = time.perf_counter()  # fit() validates at each epoch's end

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.steps += 1

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = self.validation_started = time.perf_counter()
            self.steps = 0
            if self.live is None:
                self.replay(epoch)
                if epoch:
                    print(f"train: resuming after epoch {epoch} (from {history_file.parent})")

        def replay(self, epochs: int | None = None) -> None:
            """Start fresh dvclive logs holding the first ``epochs`` kept epochs (default: all of them)."""
            self.history = self.history[:epochs]
            shutil.rmtree(live_dir, ignore_errors=True)
            shutil.rmtree(timing_dir, ignore_errors=True)
            self.live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
            self.timing = Live(str(timing_dir), dvcyaml=False, save_dvc_exp=False)
            for record in self.history:
                self._log(record)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            now = time.perf_counter()
            training = (self.validation_started if self.validation_started > self.started else now) - self.started
            record = {
                "epoch": epoch + 1,
                "learning_rate": self._learning_rate(),
                "seconds": now - self.started,
                "steps": self.steps,
                "train_images_per_s": train_images / training,
            }
            for name, value in (logs or {}).items():
                record[name] = float(value)
            self.history.append(record)
            write_json(history_file, self.history, indent=True)  # before the backup is taken
            self._log(record)

        def _log(self, record: dict[str, float]) -> None:
            assert self.live is not None and self.timing is not None
            for name in LOSSES:
                for prefix, key in (("train", name), ("val", f"val_{name}")):
                    if key in record:
                        self.live.log_metric(f"{prefix}/{name}", record[key])
            self.live.log_metric("learning_rate", record["learning_rate"])
            self.live.next_step()
            self.timing.log_metric("epoch_seconds", record["seconds"])
            self.timing.log_metric("train_images_per_s", record["train_images_per_s"])
            self.timing.next_step()

    return EpochHistory()
