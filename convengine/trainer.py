"""The training loop: fit a Sequential classifier with a loss and an optimizer, evaluate it, predict with it.

fit() shuffles each epoch, runs forward -> loss -> backward -> optimizer step per mini-batch, and records the
epoch's loss, accuracy, time and images/s in a History. Callbacks (EarlyStopping, ModelCheckpoint,
LearningRateScheduler) hook into the epochs. Ctrl-C during fit finishes the current batch, stops, and returns the
History marked interrupted, with the model exactly as after that batch and usable; a KeyboardInterrupt raised
inside a batch (a second Ctrl-C) undoes that batch instead; one during the end-of-epoch validation keeps the
epoch, with NaN validation metrics.

Reproducibility: with fit(seed=s) the order of epoch e is drawn from a generator seeded with (s, e), so a run
resumed from a checkpoint sees the same orders as an uninterrupted one; dropout draws from convengine's generator
(manual_seed), whose state a checkpoint stores. Every kernel is bitwise deterministic at any thread count, so the
same seeds give the same weights.

Data-parallel training: Trainer(..., comm=MPI.COMM_WORLD) on every rank of an mpiexec job (or shards=S in one
process) splits each global batch into fixed shards and sums their gradients in shard order, so the weights do not
depend on the number of ranks (convengine.distributed). Only rank 0 prints and writes checkpoints; evaluate() and
validation are split over the ranks; an exception on one rank ends the job.
"""
import math
import signal
import sys
import threading
import time
import warnings

import numpy as np
from tqdm import tqdm

from . import _args, _random
from . import distributed as _distributed
from . import model as _model
from .graph import Graph
from .losses import Loss
from .metrics import accuracy, class_targets
from .optim import Optimizer

__all__ = ["Trainer", "History", "Callback", "EarlyStopping", "ModelCheckpoint", "LearningRateScheduler"]


class History:
    """Per-epoch records of one fit(): `history[key]` lists 'loss', 'accuracy' (training, measured during the
    epoch; only for targets that name classes: labels or one-hot-like vectors), 'time' (seconds of training, without
    validation), 'images_per_second', 'lr', and with validation data 'val_loss' and 'val_accuracy'. `epoch` holds
    the epoch numbers (1-based, continuing across fits).

    `interrupted` is True when Ctrl-C stopped the run; `partial_epoch` then holds the metrics of the unfinished
    epoch, with 'batches' the number of its batches that completed. `stopped_early` is True when a callback stopped
    it."""

    def __init__(self):
        self.epoch = []
        self.history = {}
        self.interrupted = False
        self.stopped_early = False
        self.partial_epoch = None

    def _append(self, epoch_number, logs):
        self.epoch.append(epoch_number)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def __getitem__(self, key):
        return self.history[key]

    def __contains__(self, key):
        return key in self.history

    def __len__(self):
        return len(self.epoch)

    def __repr__(self):
        state = " interrupted" if self.interrupted else " stopped early" if self.stopped_early else ""
        return f"<History: {len(self.epoch)} epochs{state}, keys {sorted(self.history)}>"


class Callback:
    """Hooks called by Trainer.fit. `epoch` is the 0-based index of the epoch (continuing across fits); set
    trainer.stop_training = True to end the run after the current epoch."""

    def on_train_begin(self, trainer):
        pass

    def on_epoch_begin(self, trainer, epoch):
        pass

    def on_batch_end(self, trainer, batch, logs):
        pass

    def on_epoch_end(self, trainer, epoch, logs):
        pass

    def on_train_end(self, trainer, history):
        pass


class _Monitor:
    def __init__(self, monitor, mode, min_delta):
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a str, got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if mode == "auto":
            mode = "max" if "acc" in monitor else "min"
        self.monitor = monitor
        self.mode = mode
        self.min_delta = abs(float(min_delta))
        self.best = None

    def value(self, logs, who):
        if self.monitor not in logs:
            hint = " (pass validation_data to fit to get val_* values)" if self.monitor.startswith("val_") else ""
            raise ValueError(f"{who} monitors {self.monitor!r} but the epoch logs hold {sorted(logs)}{hint}")
        return float(logs[self.monitor])

    def improved(self, value):
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than min_delta for `patience` epochs. With
    restore_best_weights the model ends with the weights of its best epoch."""

    def __init__(self, monitor="val_loss", patience=0, min_delta=0.0, mode="auto", restore_best_weights=False):
        self._monitor = _Monitor(monitor, mode, min_delta)
        self.patience = _args.check_int(patience, "patience", 0)
        self.restore_best_weights = bool(restore_best_weights)
        self.stopped_epoch = None

    def on_train_begin(self, trainer):
        self._monitor.best = None
        self.wait = 0
        self.stopped_epoch = None
        self._best_state = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = self._monitor.value(logs, "EarlyStopping")
        if self._monitor.improved(value):
            self._monitor.best = value
            self.wait = 0
            if self.restore_best_weights:
                self._best_state = _snapshot(trainer.model)
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.stop_training = True
            self.stopped_epoch = epoch
            if self._best_state is not None:
                _restore(trainer.model, self._best_state)

    @property
    def best(self):
        return self._monitor.best


def _snapshot(model):
    return [p.data.copy() for p in model.parameters()], {k: a.copy() for k, a in model.buffers().items()}


def _restore(model, state):
    params, buffers = state
    for p, a in zip(model.parameters(), params):
        np.copyto(p.data, a)
    current = model.buffers()
    for k, a in buffers.items():
        np.copyto(current[k], a)


class ModelCheckpoint(Callback):
    """Save a training checkpoint (model, optimizer state, epoch count, random state) at the end of each epoch,
    or only when `monitor` improves with save_best_only. `path` may hold format fields: {epoch} (1-based) and any
    log key, e.g. "ckpt-{epoch:02d}-{val_accuracy:.3f}.npz". Trainer.load_checkpoint resumes from the file;
    convengine.load reads the model alone."""

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto"):
        self.path = str(path)
        self.save_best_only = bool(save_best_only)
        self._monitor = _Monitor(monitor, mode, 0.0)
        self.last_path = None

    def on_train_begin(self, trainer):
        self._monitor.best = None

    def on_epoch_end(self, trainer, epoch, logs):
        if self.save_best_only:
            value = self._monitor.value(logs, "ModelCheckpoint")
            if not self._monitor.improved(value):
                return
            self._monitor.best = value
        try:
            path = self.path.format(epoch=epoch + 1, **logs) if "{" in self.path else self.path
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"ModelCheckpoint path {self.path!r} cannot be formatted with epoch and "
                             f"{sorted(logs)}: {e}") from None
        trainer.save_checkpoint(path)
        self.last_path = path


class LearningRateScheduler(Callback):
    """Set the optimizer's lr to schedule(epoch, lr) at the start of each epoch (epoch is 0-based)."""

    def __init__(self, schedule):
        if not callable(schedule):
            raise TypeError(f"schedule must be callable as schedule(epoch, lr), got {schedule!r}")
        self.schedule = schedule

    def on_epoch_begin(self, trainer, epoch):
        lr = self.schedule(epoch, trainer.optimizer.lr)
        try:
            trainer.optimizer.lr = lr
        except (TypeError, ValueError) as e:
            raise ValueError(f"the learning-rate schedule returned {lr!r} for epoch {epoch}: {e}") from None


def _augmented(augment, xb, rng):
    out = augment(xb, rng)
    if not isinstance(out, np.ndarray) or out.ndim < 1 or out.shape[0] != xb.shape[0]:
        shape = out.shape if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"augment must return a batch of {xb.shape[0]} samples as a numpy array, got {shape}")
    return out


class _InterruptGuard:
    """Turn the first Ctrl-C into a request that the loop honours after the current batch. A second Ctrl-C raises
    KeyboardInterrupt at once, except inside a critical section (the optimizer step, which updates the parameters
    one by one, and the batch's snapshot and rollback), which it lets finish: the loop stops right after it anyway.
    Off the main thread no handler can be installed (and no signal arrives); a KeyboardInterrupt raised there by
    code is still caught by fit."""

    def __init__(self):
        self.requested = False
        self.critical = False
        self._previous = None
        self._installed = False

    def _handler(self, signum, frame):
        if self.requested and not self.critical:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except (ValueError, OSError):
                self._installed = False
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
        return False


class _AgreedInterruptGuard(_InterruptGuard):
    """The guard of a multi-rank fit: a Ctrl-C on one rank is only `pending` until the next gradient exchange
    carries it to every rank, which then all set `requested` together and stop after the same batch. A second
    Ctrl-C raises KeyboardInterrupt, which ends the whole job."""

    def __init__(self):
        super().__init__()
        self.pending = False

    def _handler(self, signum, frame):
        if self.pending and not self.critical:
            raise KeyboardInterrupt
        self.pending = True



def _ends_job_on_error(method):
    """Under a multi-rank communicator, an exception on one rank ends the whole job (MPI Abort) with that rank's
    message, rather than leaving the other ranks waiting in a collective."""
    def wrapper(self, *args, **kwargs):
        if self.parallel is None or self.parallel.size == 1:
            return method(self, *args, **kwargs)
        with _distributed.abort_on_error(self.parallel.comm):
            return method(self, *args, **kwargs)
    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return wrapper


def _split_fraction(fraction):
    if isinstance(fraction, (bool, np.bool_)) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise TypeError(f"validation_split must be a number in [0, 1), got {fraction!r}")
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {fraction}")
    return fraction


def _split_off(x, y, fraction):
    """(x_train, y_train, (x_val, y_val)): the last `fraction` of the samples held out, as Keras does."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError("validation_split needs x and y as numpy arrays")
    n = x.shape[0] if x.ndim else 0
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0] if y.ndim else 0} entries but x holds {n} samples")
    n_train = int(n * (1.0 - fraction))
    if n_train < 1 or n_train >= n:
        raise ValueError(f"validation_split={fraction} of {n} samples leaves an empty training or validation set")
    return x[:n_train], y[:n_train], (x[n_train:], y[n_train:])


def _batch_bounds(n, batch_size, drop_last):
    """(start, stop) of each batch over n samples. The incomplete last batch is dropped with drop_last; otherwise a
    last batch of a single sample joins the batch before it."""
    full = n // batch_size
    bounds = [(b * batch_size, (b + 1) * batch_size) for b in range(full)]
    rest = n - full * batch_size
    if rest and not drop_last:
        if rest == 1 and bounds:
            bounds[-1] = (bounds[-1][0], n)
        else:
            bounds.append((full * batch_size, n))
    return bounds


def _on_terminal():
    """Whether progress bars have a terminal to draw on (tqdm writes to stderr)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Trainer:
    """Fit `model` (a Sequential or graph-model classifier) by minimising `loss` with `optimizer`.

    `epoch` counts the epochs completed by this trainer (or restored from a checkpoint); fit(epochs=n) runs n more.

    `on_nonfinite_loss` says what fit does when a batch's loss is NaN or infinite (a diverged run): "raise" (the
    default) undoes that batch and raises FloatingPointError naming the epoch and batch; "warn" issues one
    RuntimeWarning per fit and carries on.

    `comm` (an mpi4py communicator such as MPI.COMM_WORLD) trains data-parallel: every rank builds the same model
    with the same seed and passes the same arrays to fit, whose `batch_size` is then the global batch. `shards`
    (default: the rank count; at least that) fixed micro-batches per batch have their gradients summed in shard
    order, so the weights are bitwise identical for 1 .. shards ranks, and to shards=S without comm. BatchNorm uses
    per-shard (ghost) statistics and dropout a per-shard stream; see convengine.distributed. `parallel` is the
    DataParallel plan, None for the classic single-batch trainer.
    """

    on_nonfinite_loss = "raise"

    def __init__(self, model, loss, optimizer, comm=None, shards=None):
        if not isinstance(model, (_model.Sequential, Graph)):
            raise TypeError(f"model must be a convengine Sequential or Graph, got {type(model).__name__}")
        if not isinstance(loss, Loss):
            raise TypeError(f"loss must be a convengine.losses loss, got {type(loss).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a convengine.optim optimizer, got {type(optimizer).__name__}")
        model_params = {id(p) for p in model.parameters()}
        if not {id(p) for p in optimizer.params} <= model_params:
            raise ValueError("the optimizer holds parameters that are not the model's; build it from "
                             "model.parameters()")
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self.epoch = 0
        self.stop_training = False
        self.parallel = None if comm is None and shards is None else _distributed.DataParallel(model, comm, shards)

    def _data(self, x, y, name="x"):
        """(x, targets, classes): targets are integer labels or float targets shaped like the output; classes are
        the labels, or the class of each one-hot-like target row, or None when the targets name no classes (see
        convengine.metrics.class_targets), and then no accuracy is reported."""
        x = self.model._input(x)
        if x.shape[0] == 0:
            raise ValueError(f"{name} holds no samples")
        try:
            out_shape = self.model.output_shape(x.shape[1:])
        except ValueError as e:
            raise ValueError(f"{name} of shape {x.shape} does not fit the model: {e}") from None
        if len(out_shape) != 1:
            raise ValueError(f"the model must output (N, outputs) arrays, but it gives per-sample shape {out_shape}")
        y_name = "y" if name == "x" else f"the targets of {name}"
        n = x.shape[0]
        if isinstance(y, np.ndarray) and y.ndim != 1:
            if y.shape != (n,) + out_shape:
                raise ValueError(f"{y_name} must be integer class labels of shape ({n},) or targets shaped like "
                                 f"the model output, {(n,) + out_shape}, got shape {y.shape}")
            if not np.issubdtype(y.dtype, np.floating):
                raise TypeError(f"{y_name}, targets shaped like the model output, must be float, got dtype "
                                f"{y.dtype}")
            if not np.all(np.isfinite(y)):
                raise ValueError(f"{y_name} holds NaN or infinite values")
            targets = y.astype(self.model.dtype, copy=False)
            return x, targets, class_targets(targets)
        labels = _args.check_labels(y, n, out_shape[0], name=y_name)
        return x, labels, labels

    def _order(self, n, shuffle, seed, epoch):
        if not shuffle:
            return np.arange(n)
        rng = _random.generator() if seed is None else np.random.default_rng([seed, epoch])
        return rng.permutation(n)

    @_ends_job_on_error
    def fit(self, x, y, epochs, batch_size, validation_data=None, shuffle=True, seed=None, callbacks=None,
            verbose=1, validation_split=0.0, drop_last=False, augment=None):
        """Train for `epochs` more epochs of mini-batches of `batch_size`. Returns a History.

        y: integer class labels (N,), or targets shaped like the model output (N, K), such as the article's target
        vectors for MSELoss or regression values. 'accuracy' is recorded for labels and for one-hot-like targets
        (see convengine.metrics.class_targets), and left out for targets that name no classes.
        validation_data=(x_val, y_val) adds 'val_loss' (and 'val_accuracy') per epoch; validation_split=f instead
        holds out the last fraction f of x and y (taken before any shuffling) for it.
        A last batch of a single sample is trained as part of the batch before it (a batch of one has no batch
        statistics for BatchNorm2d); drop_last=True skips the incomplete last batch of each epoch instead.
        augment: a callable (x_batch, rng) -> x_batch applied to each training batch, e.g.
        convengine.augment.Compose([RandomCrop(4), RandomFlip()]); rng is a numpy Generator seeded from
        (seed, epoch) when seed is given, else drawn from convengine's generator (manual_seed).
        verbose: 0 silent; 1 a progress bar on a terminal, else one line per epoch; 2 one line per epoch."""
        epochs = _args.check_int(epochs, "epochs", 0)
        batch_size = _args.check_int(batch_size, "batch_size", 1)
        if seed is not None:
            seed = _args.check_int(seed, "seed", 0)
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0 (silent), 1 (progress bar) or 2 (one line per epoch), got {verbose!r}")
        drop_last = _args.check_bool(drop_last, "drop_last")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be callable as augment(x_batch, rng), got {augment!r}")
        if _split_fraction(validation_split):
            if validation_data is not None:
                raise ValueError("pass validation_data or validation_split, not both")
            x, y, validation_data = _split_off(x, y, validation_split)
        if self.parallel is not None:
            verbose = verbose if self.parallel.is_root else 0
            self.parallel.check_replicas("at the start of fit")
        x, y, classes = self._data(x, y)
        if drop_last and x.shape[0] < batch_size:
            raise ValueError(f"drop_last with batch_size={batch_size} and {x.shape[0]} samples leaves no batch")
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise TypeError("validation_data must be a pair (x_val, y_val)")
            validation_data = self._data(*validation_data, name="validation_data")
        if self.on_nonfinite_loss not in ("raise", "warn"):
            raise ValueError(f"on_nonfinite_loss must be 'raise' or 'warn', got {self.on_nonfinite_loss!r}")
        callbacks = list(callbacks or [])
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be convengine.trainer.Callback instances, got {type(cb).__name__}")

        history = History()
        self.stop_training = False
        self._warned_nonfinite = False
        last_epoch = self.epoch + epochs
        for cb in callbacks:
            cb.on_train_begin(self)
        multi_rank = self.parallel is not None and self.parallel.size > 1
        with (_AgreedInterruptGuard() if multi_rank else _InterruptGuard()) as guard:
            try:
                for _ in range(epochs):
                    epoch = self.epoch
                    for cb in callbacks:
                        cb.on_epoch_begin(self, epoch)
                    order = self._order(x.shape[0], shuffle, seed, epoch)
                    batches = _batch_bounds(x.shape[0], batch_size, drop_last)
                    augment_rng = None if augment is None else self._augment_rng(seed, epoch)
                    logs, complete = self._run_epoch(x, y, classes, order, batches, epoch, last_epoch, guard,
                                                     callbacks, verbose, validation_data, augment, augment_rng)
                    if not complete:
                        history.interrupted = True
                        history.partial_epoch = logs
                        break
                    self.epoch += 1
                    history._append(self.epoch, logs)
                    for cb in callbacks:
                        cb.on_epoch_end(self, epoch, logs)
                    if guard.requested:
                        history.interrupted = True
                        break
                    if self.stop_training:
                        history.stopped_early = True
                        break
            except KeyboardInterrupt:
                if multi_rank:
                    raise  # the other ranks cannot know: the job ends
                history.interrupted = True
        if history.interrupted and verbose:
            print("training interrupted: the model keeps the weights of the last finished batch", flush=True)
        for cb in callbacks:
            cb.on_train_end(self, history)
        return history

    @staticmethod
    def _augment_rng(seed, epoch):
        if seed is None:
            return np.random.default_rng(_random.generator().integers(2 ** 63))
        return np.random.default_rng([seed, epoch, 1])

    def _run_epoch(self, x, y, classes, order, batches, epoch, last_epoch, guard, callbacks, verbose,
                   validation_data, augment=None, augment_rng=None):
        n_batches = len(batches)
        lr = self.optimizer.lr
        per_sample = self.loss.reduction == "mean"
        loss_sum = 0.0
        correct = seen = 0
        use_bar = verbose == 1 and _on_terminal()
        bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{last_epoch}", unit="batch", leave=True,
                   disable=not use_bar, dynamic_ncols=True)
        start = time.perf_counter()
        complete = True
        try:
            for b, (lo, hi) in enumerate(batches):
                idx = order[lo:hi]
                xb, yb = x[idx], y[idx]
                if augment is not None:
                    xb = _augmented(augment, xb, augment_rng)
                # A KeyboardInterrupt inside the batch (a second Ctrl-C, or one raised by code off the main thread)
                # undoes what forward changed, so that the batch counts for nothing: the model and the dropout
                # stream are exactly as after the previous batch.
                guard.critical = True
                saved = self._batch_state()
                guard.critical = False
                try:
                    if self.parallel is not None:
                        # every rank gets the same global-batch loss, so a non-finite one stops them all alike
                        # (an augmented batch exists only as xb: its shards are taken from it)
                        source = (x, y, idx) if augment is None else (xb, yb, np.arange(len(idx)))
                        value, batch_correct, stop = self.parallel.gradients(
                            self.loss, *source, self._count_correct, getattr(guard, "pending", guard.requested))
                        guard.requested = guard.requested or stop
                        if not math.isfinite(value):
                            self._nonfinite_loss(value, xb, epoch, b, n_batches, saved, guard)
                    else:
                        out = self.model.forward(xb, training=True)
                        value = self.loss(out, yb)
                        if not math.isfinite(value):
                            self._nonfinite_loss(value, xb, epoch, b, n_batches, saved, guard)
                        grad = self.loss.backward()
                        self.optimizer.zero_grad()
                        self.model.backward(grad)
                        batch_correct = self._count_correct(out, yb)
                except KeyboardInterrupt:
                    if self.parallel is not None and self.parallel.size > 1:
                        raise  # the other ranks are inside the same step: the job ends
                    guard.critical = True
                    self._restore_batch_state(saved)
                    complete = False
                    n_batches = b
                    break
                guard.critical = True
                self.optimizer.step()
                guard.critical = False
                loss_sum += value * len(idx) if per_sample else value
                correct += batch_correct
                seen += len(idx)
                if not bar.disable:
                    elapsed = time.perf_counter() - start
                    acc = f" acc={correct / seen:.4f}" if classes is not None else ""
                    bar.set_postfix_str(f"loss={loss_sum / seen:.4f}{acc} "
                                        f"{seen / max(elapsed, 1e-9):,.0f} img/s", refresh=False)
                    bar.update(1)
                for cb in callbacks:
                    cb.on_batch_end(self, b, {"loss": value, "size": len(idx)})
                if guard.requested and b + 1 < n_batches:
                    complete = False
                    n_batches = b + 1
                    break
            guard.critical = False
            elapsed = time.perf_counter() - start
            logs = {"loss": loss_sum / seen if seen else math.nan}
            if classes is not None:
                logs["accuracy"] = correct / seen if seen else math.nan
            logs.update(time=elapsed, images_per_second=seen / max(elapsed, 1e-9), lr=lr)
            if not complete:
                logs["batches"] = n_batches
                return logs, False
            if validation_data is not None:
                batch_size = max(hi - lo for lo, hi in batches) if batches else 1
                try:
                    val = self.evaluate(*validation_data[:2], batch_size=max(batch_size, 256))
                    logs.update({f"val_{key}": value for key, value in val.items()})
                except KeyboardInterrupt:
                    # A second Ctrl-C during validation: every batch of the epoch is applied, so the epoch counts
                    # as done (a resume must not repeat it); only its validation metrics are unknown. fit stops
                    # after it.
                    logs["val_loss"] = math.nan
                    if validation_data[2] is not None:
                        logs["val_accuracy"] = math.nan
                    guard.requested = True
            if not bar.disable:
                bar.set_postfix_str(self._line(logs), refresh=True)
        finally:
            bar.close()
        if verbose == 2 or (verbose == 1 and not use_bar):
            print(f"epoch {epoch + 1}/{last_epoch}: {self._line(logs)}", flush=True)
        return logs, True

    def _nonfinite_loss(self, value, xb, epoch, b, n_batches, saved, guard):
        """A batch's loss is NaN or infinite: undo the batch and raise, or warn once per fit (on_nonfinite_loss)."""
        where = f"epoch {epoch + 1}, batch {b + 1} of {n_batches}"
        if self.on_nonfinite_loss == "warn":
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(f"the training loss is {value} at {where}: training diverged", RuntimeWarning,
                              stacklevel=4)
            return
        guard.critical = True
        self._restore_batch_state(saved)
        guard.critical = False
        bad_inputs = int(xb.size - np.count_nonzero(np.isfinite(xb)))
        bad_weights = sum(int(p.data.size - np.count_nonzero(np.isfinite(p.data))) for p in self.model.parameters())
        raise FloatingPointError(
            f"the training loss is {value} at {where}: training diverged; this batch was undone and no more were "
            f"run. Usual causes: a learning rate too high (try a tenth of {self.optimizer.lr:g}), NaN or infinite "
            f"values in the input (this batch holds {bad_inputs}), weights already non-finite ({bad_weights} now), "
            f"or unscaled input (images in 0..255 rather than 0..1). Set trainer.on_nonfinite_loss = 'warn' to "
            f"only warn.")

    def _batch_state(self):
        return [a.copy() for a in self.model.buffers().values()], _random.get_state()

    def _restore_batch_state(self, saved):
        buffers, random_state = saved
        for live, a in zip(self.model.buffers().values(), buffers):
            np.copyto(live, a)
        _random.set_state(random_state)

    @staticmethod
    def _count_correct(out, yb):
        """Correct predictions in a batch whose targets are labels or one-hot-like rows (0 for targets that name no
        classes: fit then records no accuracy)."""
        classes = yb if yb.ndim == 1 else class_targets(yb)
        return 0 if classes is None else int(np.count_nonzero(out.argmax(axis=1) == classes))

    # The name progress lines give validation_data (the command line calls its held-out split "test").
    validation_label = "val"

    def _line(self, logs):
        text = f"loss={logs['loss']:.4f}"
        if "accuracy" in logs:
            text += f" acc={logs['accuracy']:.4f}"
        if "val_loss" in logs:
            text += f" {self.validation_label}_loss={logs['val_loss']:.4f}"
        if "val_accuracy" in logs:
            text += f" {self.validation_label}_acc={logs['val_accuracy']:.4f}"
        return text + f" {logs['images_per_second']:,.0f} img/s {logs['time']:.2f}s"

    @_ends_job_on_error
    def evaluate(self, x, y, batch_size=256):
        """{'loss': mean loss per sample, 'accuracy': fraction of argmax predictions equal to the true classes} in
        inference mode. y as for fit; 'accuracy' is left out for targets that name no classes."""
        return self._evaluate(*self._data(x, y), batch_size=batch_size)

    def _evaluate(self, x, targets, classes, batch_size=256):
        outputs = self.predict(x, batch_size)
        value = self.loss(outputs, targets)
        if self.loss.reduction == "sum":
            value /= x.shape[0]
        result = {"loss": float(value)}
        if classes is not None:
            result["accuracy"] = accuracy(classes, outputs)
        return result

    def predict(self, x, batch_size=256):
        """Model outputs (scores) for x, batch by batch in inference mode; argmax(axis=1) gives classes. Under a
        communicator the batches are split over the ranks and every rank receives all outputs."""
        if self.parallel is not None:
            return self.parallel.predict(x, batch_size)
        return self.model.predict(x, batch_size)

    def save_checkpoint(self, path):
        """Save the model with everything needed to resume training exactly: optimizer slots and hyper-parameters,
        the epoch count and convengine's random state (dropout). Under a communicator call it on every rank: rank 0
        writes the file and the others wait for it, so that any rank may resume from it at once."""
        if self.parallel is not None and not self.parallel.is_root:
            self.parallel.barrier()
            return
        opt_desc, opt_arrays = self.optimizer.state_dict()
        training = {"epoch": self.epoch, "optimizer": opt_desc, "random_state": _random.get_state()}
        _model._save(self.model, path, training=training,
                     state_arrays={f"optimizer/{k}": a for k, a in opt_arrays.items()})
        if self.parallel is not None:
            self.parallel.barrier()

    def load_checkpoint(self, path):
        """Restore a checkpoint written by save_checkpoint (ModelCheckpoint) into this trainer's model and
        optimizer, which must have the same architecture and optimizer type. Nothing changes if it fails."""
        saved, training, state = _model._read(path, with_state=True)
        if training is None:
            raise ValueError(f"{path}: a model file without training state; use convengine.load for it")
        if saved.description()["layers"] != self.model.description()["layers"]:
            raise ValueError(f"{path}: the checkpoint's architecture differs from this trainer's model")
        epoch = training.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"{path}: epoch must be an int >= 0, got {epoch!r}")
        old_random = _random.get_state()
        try:
            _random.set_state(training.get("random_state"))
            self.optimizer.load_state_dict(
                training.get("optimizer"),
                {k[len("optimizer/"):]: a for k, a in state.items() if k.startswith("optimizer/")})
        except ValueError as e:
            _random.set_state(old_random)
            raise ValueError(f"{path}: {e}") from None
        for p, q in zip(self.model.parameters(), saved.parameters()):
            np.copyto(p.data, q.data)
        for layer, saved_layer in zip(self.model.layers, saved.layers):
            for name, a in saved_layer.buffers().items():
                np.copyto(layer.buffers()[name], a)
        self.model.metadata = saved.metadata
        self.epoch = epoch
