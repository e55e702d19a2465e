"""The training log: each finished epoch once in dvclive, also across a killed and resumed run."""

from __future__ import annotations

import datetime
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trafficdet.io import read_json, write_json

if TYPE_CHECKING:
    from dvclive import Live

LOSSES = ("total_loss", "cls_loss", "box_loss", "model_loss")
SKIPPED_STEPS = 2  # the first steps trace (and with XLA compile) the train step: not the steady rate
MEASURED_STEPS = 20  # the rate of the estimate: over these steps, or the rest of a shorter first epoch


def duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``2 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def clock(seconds_from_now: float) -> str:
    """The local wall-clock time that far from now, as ``HH:MM`` (with the date if it is not today)."""
    now = datetime.datetime.now()
    end = now + datetime.timedelta(seconds=seconds_from_now)
    return end.strftime("%H:%M") if end.date() == now.date() else end.strftime("%Y-%m-%d %H:%M")


class EpochLog:
    """The history callback's work, without its Keras base class (added by make_history_callback()).

    Each finished epoch is logged once to dvclive: losses and learning rate in ``live_dir``,
    seconds and images/s (measurements, not a function of the inputs) in ``timing_dir``, with
    ``device`` (what trains, trafficdet/device.py), the machine's other fact. It also says how long
    training will take (``estimate``): after the first few steps (from the steady rate of
    training steps) and again after the first epoch (with validation).

    The history of finished epochs is kept beside the BackupAndRestore backup. On
    (re)start, Keras tells the first epoch it will run; the history is cut to the epochs
    before it and replayed into a fresh dvclive directory, so an epoch that ran but was
    not backed up before a kill is logged once, not twice.
    """

    model: Any  # set by Keras (tf.keras.callbacks.Callback)

    def __init__(
        self, live_dir: Path, timing_dir: Path, history_file: Path, train_images: int, epochs: int, batch_size: int, device: str
    ) -> None:
        super().__init__()  # the Keras callback's, next in the subclass's MRO
        self.live_dir, self.timing_dir, self.history_file, self.device = live_dir, timing_dir, history_file, device
        self.train_images, self.epochs, self.batch_size = train_images, epochs, batch_size
        self.steps_per_epoch = max(train_images // batch_size, 1)  # Model Maker trains whole batches only
        self.live: Live | None = None
        self.timing: Live | None = None
        self.history: list[dict[str, float]] = read_json(self.history_file) if self.history_file.exists() else []
        self.started = self.validation_started = 0.0
        self.steps = 0  # batches this process ran in the current epoch: the same on every worker
        self.first_epoch: int | None = None  # the first epoch this process runs (later after a resume)
        self.rate_from = 0.0
        self.train_rate = 0.0  # images/s of training steps, measured in the first epoch

    def estimate(self, epochs_left: int, seconds_left: float, rate: float, **measured: float) -> None:
        """Print when training ends and log the figures (wall clock only here and in reports/timing)."""
        assert self.timing is not None and self.first_epoch is not None
        line = (
            f"train: {self.train_images:,} images x {epochs_left} epoch{'s' if epochs_left > 1 else ''} "
            f"at {rate:.1f} images/s -> "
            f"about {duration(seconds_left)} more, ends ~{clock(seconds_left)}"
        )
        if "validation_s" in measured:
            line += f" (epoch {self.first_epoch + 1}: {duration(measured['epoch_s'])}, validation included)"
        else:
            line += f" (training steps only, measured over steps {SKIPPED_STEPS + 1}-{self.steps}; refined after the epoch)"
        print(f"\n{line}", flush=True)  # on a line of its own: Keras' progress bar ends without a newline
        figures = {"images": self.train_images, "epochs_left": epochs_left, "images_per_s": rate, "seconds_left": seconds_left}
        for name, value in {**figures, **measured}.items():
            self.timing.log_metric(f"estimate/{name}", round(value, 2), plot=False)
        self.timing.log_metric("estimate/ends_at", clock(seconds_left), plot=False)
        self.timing.make_summary()

    def _learning_rate(self) -> float:
        import tensorflow as tf

        optimizer = self.model.optimizer
        rate = optimizer.learning_rate
        value = rate(optimizer.iterations) if callable(rate) else rate
        return float(tf.keras.backend.get_value(value))  # also a MirroredVariable, under a strategy

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.validation_started = time.perf_counter()  # fit() validates at each epoch's end

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.steps += 1
        if self.first_epoch is None or self.train_rate or len(self.history) > self.first_epoch:
            return
        skipped = min(SKIPPED_STEPS, self.steps_per_epoch - 1)
        if self.steps == skipped:
            self.rate_from = time.perf_counter()
        elif self.steps == min(skipped + MEASURED_STEPS, self.steps_per_epoch):
            self.train_rate = (self.steps - skipped) * self.batch_size / (time.perf_counter() - self.rate_from)
            steps_left = (self.epochs - self.first_epoch) * self.steps_per_epoch - self.steps
            self.estimate(self.epochs - self.first_epoch, steps_left * self.batch_size / self.train_rate, self.train_rate)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = self.validation_started = time.perf_counter()
        self.steps = 0
        if self.live is None:
            self.replay(epoch)
            if epoch:
                print(f"train: resuming after epoch {epoch} (from {self.history_file.parent})")
            self.first_epoch = epoch
            if self.steps_per_epoch == 1:  # no steady step to time: the first whole epoch will tell
                self.train_rate = -1.0

    def replay(self, epochs: int | None = None) -> None:
        """Start fresh dvclive logs holding the first ``epochs`` kept epochs (default: all of them)."""
        from dvclive import Live

        self.history = self.history[:epochs]
        shutil.rmtree(self.live_dir, ignore_errors=True)
        shutil.rmtree(self.timing_dir, ignore_errors=True)
        self.live = Live(str(self.live_dir), dvcyaml=False, save_dvc_exp=False)
        self.timing = Live(str(self.timing_dir), dvcyaml=False, save_dvc_exp=False)
        if self.device:
            self.timing.log_metric("device", self.device, plot=False)
            self.timing.make_summary()
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
            "train_images_per_s": self.train_images / training,
        }
        for name, value in (logs or {}).items():
            record[name] = float(value)
        self.history.append(record)
        write_json(self.history_file, self.history, indent=True)  # before the backup is taken
        self._log(record)
        if epoch == self.first_epoch and epoch + 1 < self.epochs:
            validation = now - self.validation_started if self.validation_started > self.started else 0.0
            rate = self.train_rate if self.train_rate > 0 else self.train_images / training
            per_epoch = self.steps_per_epoch * self.batch_size / rate + validation
            left = self.epochs - epoch - 1
            self.estimate(left, left * per_epoch, rate, epoch_s=now - self.started, validation_s=validation)

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


def make_history_callback(
    live_dir: Path,
    timing_dir: Path,
    history_file: Path,
    train_images: int,
    epochs: int = 1,
    batch_size: int = 1,
    device: str = "",
) -> Any:
    """A Keras callback that logs each epoch once to dvclive and says when training ends (EpochLog)."""
    import tensorflow as tf

    class EpochHistory(EpochLog, tf.keras.callbacks.Callback):
        """EpochLog as a Keras callback: TensorFlow is imported only when training starts."""

    return EpochHistory(live_dir, timing_dir, history_file, train_images, epochs, batch_size, device)
