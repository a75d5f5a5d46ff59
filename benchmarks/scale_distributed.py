"""Data-parallel training throughput: images/s at 1 and 2 MPI ranks x 1 and 2 threads, and a cost model of
larger clusters from the measured step time and the bytes each step exchanges.

    python benchmarks/scale_distributed.py                  # every net, every configuration (about a minute)
    python benchmarks/scale_distributed.py --nets cifar --steps 10 --json run.json

Each configuration runs in its own process(es), started as `mpiexec -n RANKS python this-file --worker ...` with
OMP_NUM_THREADS=THREADS (the classic and single-process sharded trainers run without mpiexec). A worker trains
one epoch of `steps` batches of synthetic data (after a warm-up epoch of 2 batches) and rank 0 prints one JSON
line: images/s, ms per step, and the seconds per step that DataParallel spent computing its shards, exchanging the
records (the Allgatherv, waiting for the slowest rank included; with the reduce-scatter exchange the slice sums
too) and summing them.

The cost model (printed after the table; benchmarks/README.md explains it): with one rank per node computing one
shard of `batch` images per step (shards = ranks = P, global batch P * batch), a step gathers P records of R bytes,
so each rank receives (P - 1) * R bytes: t_comm = (P - 1) * R * 8 / bandwidth. It dominates once it exceeds the
compute time t_c of one shard, at P = 1 + t_c * bandwidth / (8 R). The reduce-scatter exchange
(CONVENGINE_EXCHANGE=reduce_scatter: the sum per coordinate still in shard order, so the same bits) moves about
2 (P - 1) / P * R per rank.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (net, images per shard, default steps)
NETS = {"digits": ((1, 8, 8), 32, 60), "mnist": ((1, 28, 28), 64, 30), "cifar": ((3, 32, 32), 64, 12)}
# (label, ranks, threads per rank, shards (None: the classic whole-batch trainer), exchange)
CONFIGS = [("classic", 1, 1, None, None), ("classic", 1, 2, None, None), ("1 shard", 1, 2, 1, None),
           ("2 shards, 1 process", 1, 1, 2, None), ("2 shards, 1 process", 1, 2, 2, None),
           ("2 shards, 2 ranks", 2, 1, 2, "allgather"),
           ("2 shards, 2 ranks, reduce-scatter", 2, 1, 2, "reduce_scatter")]
BANDWIDTHS_GBPS = (10, 25, 100)


def build(net):
    import convengine
    from convengine import layers as L
    from convengine.model import lenet

    convengine.manual_seed(0)
    shape = NETS[net][0]
    if net != "cifar":
        return lenet(shape, 10)
    return convengine.Sequential([
        L.Conv2d(3, 32, 3, padding=1), L.BatchNorm2d(32), L.ReLU(), L.MaxPool2d(2),
        L.Conv2d(32, 64, 3, padding=1), L.BatchNorm2d(64), L.ReLU(), L.MaxPool2d(2),
        L.Conv2d(64, 128, 3, padding=1), L.BatchNorm2d(128), L.ReLU(), L.MaxPool2d(2),
        L.Flatten(), L.Linear(128 * 4 * 4, 256), L.ReLU(), L.Dropout(0.25), L.Linear(256, 10)],
        input_shape=shape)


def worker(args):
    from convengine import distributed
    from convengine.losses import CrossEntropyLoss
    from convengine.optim import SGD
    from convengine.trainer import Trainer

    comm = distributed.world()
    ranks = 1 if comm is None else comm.Get_size()
    model = build(args.net)
    shards = args.shards
    per_shard = NETS[args.net][1]
    batch = per_shard * (shards or 1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch * args.steps,) + NETS[args.net][0]).astype(np.float32)
    y = rng.integers(0, 10, batch * args.steps)
    trainer = Trainer(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.01, momentum=0.9), comm=comm,
                      shards=shards)
    trainer.fit(x[:2 * batch], y[:2 * batch], epochs=1, batch_size=batch, verbose=0)
    parts = None
    if trainer.parallel is not None:
        before = dict(trainer.parallel.seconds)
    start = time.perf_counter()
    trainer.fit(x, y, epochs=1, batch_size=batch, verbose=0)
    seconds = time.perf_counter() - start
    alone = None
    if trainer.parallel is not None:
        parts = {k: (trainer.parallel.seconds[k] - before[k]) / args.steps * 1e3 for k in before}
        if ranks > 1:
            alone = exchange_alone_ms(trainer.parallel)
    if comm is None or comm.Get_rank() == 0:
        params = sum(p.data.size for p in model.parameters())
        exchange = trainer.parallel.exchange if trainer.parallel is not None and ranks > 1 else None
        print(json.dumps({"net": args.net, "ranks": ranks, "threads": args.threads, "shards": shards,
                          "exchange": exchange, "exchange_alone_ms": alone,
                          "batch": batch, "steps": args.steps, "images_per_second": batch * args.steps / seconds,
                          "ms_per_step": seconds / args.steps * 1e3, "parts_ms": parts, "params": params,
                          "grad_bytes": params * 4,
                          "record_bytes": trainer.parallel.record_bytes if trainer.parallel else None}))


def exchange_alone_ms(parallel, repeats=30):
    """Median ms of the step's exchange alone (the records of the last step), the ranks lined up by a barrier
    first, so that no rank waits for another's compute."""
    times = []
    for _ in range(repeats):
        parallel.comm.Barrier()
        start = time.perf_counter()
        if parallel.exchange == "allgather":
            parallel._exchange()
        else:
            parallel._exchange_sliced(parallel._layout)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def run_config(net, ranks, threads, shards, exchange, steps):
    command = [sys.executable, os.path.abspath(__file__), "--worker", net, "--threads", str(threads),
               "--steps", str(steps)]
    if shards is not None:
        command += ["--shards", str(shards)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CONVENGINE_EXCHANGE=exchange or "allgather",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if ranks > 1:
        local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        command = [local if os.access(local, os.X_OK) else "mpiexec", "-n", str(ranks)] + command
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cost_model(results):
    """Rows of the paper model per net. t_c, one rank's step on one shard, is the fastest measured step at the
    shard's batch (classic or 1 shard, 1 or 2 threads): a faster node makes communication dominate sooner, so
    the fastest figure is the cautious one."""
    rows = []
    for net in NETS:
        steps = [r for r in results if r["net"] == net and r["shards"] in (None, 1)]
        records = [r["record_bytes"] for r in results if r["net"] == net and r["record_bytes"]]
        if not steps or not records:
            continue
        node = min(steps, key=lambda r: r["ms_per_step"])
        t_c = node["ms_per_step"] / 1e3
        record = records[0]
        row = {"net": net, "params": node["params"], "record_bytes": record, "batch_per_rank": node["batch"],
               "step_ms": t_c * 1e3, "step_threads": node["threads"]}
        for gbps in BANDWIDTHS_GBPS:
            per_record = record * 8 / (gbps * 1e9)
            row[f"allgather_ms_P8_{gbps}"] = 7 * per_record * 1e3
            row[f"P_dominates_allgather_{gbps}"] = 1 + t_c / per_record
            row[f"reduce_scatter_ms_{gbps}"] = 2 * per_record * 1e3  # the limit of 2 (P - 1) / P * R for large P
        rows.append(row)
    return rows


def markdown(results, model):
    lines = ["| net | configuration | ranks x threads | batch | images/s | ms/step | compute / exchange / sum ms "
             "| exchange alone ms |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        label = next(c[0] for c in CONFIGS
                     if (c[1], c[2], c[3], c[4]) == (r["ranks"], r["threads"], r["shards"], r.get("exchange")))
        parts = r["parts_ms"]
        split = "" if parts is None else f"{parts['compute']:.2f} / {parts['exchange']:.2f} / {parts['reduce']:.2f}"
        lines.append(f"| {r['net']} | {label} | {r['ranks']} x {r['threads']} | {r['batch']} | "
                     f"{r['images_per_second']:,.0f} | {r['ms_per_step']:.2f} | {split} | "
                     f"{'' if r.get('exchange_alone_ms') is None else format(r['exchange_alone_ms'], '.3f')} |")
    lines += ["", "| net | params | record bytes | shard step t_c | " +
              " | ".join(f"allgather P=8 @{g} Gb/s" for g in BANDWIDTHS_GBPS) + " | " +
              " | ".join(f"P where allgather dominates @{g}" for g in BANDWIDTHS_GBPS) + " | " +
              " | ".join(f"reduce-scatter+allgather @{g}" for g in BANDWIDTHS_GBPS) + " |",
              "|---" * (4 + 3 * len(BANDWIDTHS_GBPS)) + "|"]
    for m in model:
        lines.append(f"| {m['net']} | {m['params']:,} | {m['record_bytes']:,} | {m['step_ms']:.2f} ms "
                     f"(batch {m['batch_per_rank']}, {m['step_threads']} thr) | " +
                     " | ".join(f"{m[f'allgather_ms_P8_{g}']:.2f} ms" for g in BANDWIDTHS_GBPS) + " | " +
                     " | ".join(f"{m[f'P_dominates_allgather_{g}']:.0f}" for g in BANDWIDTHS_GBPS) + " | " +
                     " | ".join(f"{m[f'reduce_scatter_ms_{g}']:.2f} ms" for g in BANDWIDTHS_GBPS) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated: " + ", ".join(NETS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--report", metavar="PATH", help="print the tables of a run saved with --json; run nothing")
    parser.add_argument("--worker", metavar="NET", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.net = args.worker
        args.steps = args.steps or NETS[args.net][2]
        worker(args)
        return 0
    import platform
    if args.report:
        with open(args.report) as f:
            results = json.load(f)["results"]
        print(markdown(results, cost_model(results)))
        return 0
    results = []
    for net in args.nets.split(","):
        if net not in NETS:
            parser.error(f"unknown net {net!r}")
        for _, ranks, threads, shards, exchange in CONFIGS:
            results.append(run_config(net, ranks, threads, shards, exchange, args.steps or NETS[net][2]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    model = cost_model(results)
    print(f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}")
    print(markdown(results, model))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "model": model}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
