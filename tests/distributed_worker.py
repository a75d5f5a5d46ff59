"""The program that test_distributed.py starts under mpiexec (and runs in-process without MPI).

    python tests/distributed_worker.py train OUT [--shards S] [--epochs E] [--checkpoint PATH]
    python tests/distributed_worker.py resume OUT --checkpoint PATH [--shards S] [--epochs E]
    python tests/distributed_worker.py fail OUT
    python tests/distributed_worker.py interrupt OUT
    python tests/distributed_worker.py fit OUT --model MODEL.npz --data DATA.npz [--shards S] [--epochs E]
                                       [--batch B] [--adam]

`train` fits a tiny net with BatchNorm and Dropout on a subset of the digits and writes, from every rank,
OUT/rank<r>.npz with its parameters and buffers and rank 0's history; `resume` builds the model with another seed,
loads the checkpoint and trains on; `fail` gives rank 1 labels out of range, so that rank fails inside fit;
`interrupt` sends SIGINT (a Ctrl-C) to rank 1 alone after its second batch, and every rank writes its weights and
OUT/interrupt<r>.json with where its fit stopped; `fit` trains a saved model (Sequential.save) on the arrays x, y,
x_val, y_val of DATA.npz, with cross-entropy and SGD (momentum, Nesterov, weight decay) or Adam, and writes what
`train` writes (test_distributed's drawn models).
"""
import argparse
import json
import os
import signal
import sys

import numpy as np

import convengine
from convengine import data, distributed
from convengine import layers as L
from convengine.losses import CrossEntropyLoss
from convengine.optim import SGD
from convengine.trainer import Callback, ModelCheckpoint, Trainer

SAMPLES, VALIDATION, BATCH = 120, 60, 30


def build(seed):
    convengine.manual_seed(seed)
    model = convengine.Sequential([
        L.Conv2d(1, 4, 3, padding=1), L.BatchNorm2d(4), L.ReLU(), L.MaxPool2d(2),
        L.Flatten(), L.Linear(4 * 4 * 4, 16), L.ReLU(), L.Dropout(0.3), L.Linear(16, 10)])
    return model


def digits():
    (x, y), (x_val, y_val) = data.load_digits()
    return x[:SAMPLES], y[:SAMPLES], x_val[:VALIDATION], y_val[:VALIDATION]


def trainer_for(model, comm, shards):
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return Trainer(model, CrossEntropyLoss(), optimizer, comm=comm, shards=shards)


def write(out, trainer, history, rank):
    arrays = {f"param/{p.name}": p.data for p in trainer.model.parameters()}
    arrays.update({f"buffer/{k}": a for k, a in trainer.model.buffers().items()})
    np.savez(os.path.join(out, f"rank{rank}.npz"), **arrays)
    if rank == 0:
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump({k: history[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}, f)


def fit_saved(model_path, data_path, comm, shards, epochs, batch, adam):
    """(trainer, history) of `fit`: the same calls in-process (comm None) and under mpiexec."""
    from convengine.optim import Adam
    convengine.manual_seed(7)        # the same random state on every rank, as the trainer checks
    model = convengine.load(model_path)
    with np.load(data_path) as f:
        x, y, x_val, y_val = (f[k] for k in ("x", "y", "x_val", "y_val"))
    if adam:
        optimizer = Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    else:
        optimizer = SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-4)
    trainer = Trainer(model, CrossEntropyLoss(), optimizer, comm=comm, shards=shards)
    history = trainer.fit(x, y, epochs=epochs, batch_size=batch, validation_data=(x_val, y_val), seed=3, verbose=0)
    return trainer, history


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("train", "resume", "fail", "interrupt", "fit"))
    parser.add_argument("out")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoint")
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--adam", action="store_true")
    args = parser.parse_args(argv)
    comm = distributed.world()
    rank = 0 if comm is None else comm.Get_rank()
    if args.mode == "fit":
        trainer, history = fit_saved(args.model, args.data, comm, args.shards, args.epochs, args.batch, args.adam)
        write(args.out, trainer, history, rank)
        return 0
    x, y, x_val, y_val = digits()
    if args.mode == "fail":
        model = build(0)
        trainer = trainer_for(model, comm, args.shards)
        if rank == 1:
            y = y.copy()
            y[7] = 99
        trainer.fit(x, y, epochs=1, batch_size=BATCH, seed=1, verbose=0)
        return 0
    if args.mode == "interrupt":
        class CtrlCOnRank1(Callback):
            def on_batch_end(self, trainer, batch, logs):
                if rank == 1 and trainer.epoch == 0 and batch == 1:
                    os.kill(os.getpid(), signal.SIGINT)

        trainer = trainer_for(build(0), comm, args.shards)
        history = trainer.fit(x, y, epochs=args.epochs, batch_size=BATCH, seed=1, callbacks=[CtrlCOnRank1()],
                              verbose=0)
        arrays = {f"param/{p.name}": p.data for p in trainer.model.parameters()}
        np.savez(os.path.join(args.out, f"rank{rank}.npz"), **arrays)
        with open(os.path.join(args.out, f"interrupt{rank}.json"), "w") as f:
            json.dump({"interrupted": history.interrupted, "epochs": len(history),
                       "batches": (history.partial_epoch or {}).get("batches")}, f)
        return 0
    model = build(0 if args.mode == "train" else 123)
    trainer = trainer_for(model, comm, args.shards)
    callbacks = []
    if args.mode == "resume":
        trainer.load_checkpoint(args.checkpoint)
    elif args.checkpoint:
        callbacks.append(ModelCheckpoint(args.checkpoint))
    history = trainer.fit(x, y, epochs=args.epochs, batch_size=BATCH, validation_data=(x_val, y_val), seed=1,
                          callbacks=callbacks, verbose=0)
    write(args.out, trainer, history, rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
