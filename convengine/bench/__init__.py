"""Speed measurements of convengine, shared by `python -m convengine bench` and the pytest-benchmark suite in the
source tree's `benchmarks/` folder (both import from here; nothing here reads files outside the package).

- `cases`: the benchmarked shapes (`ConvCase`, `PoolCase`, the default and tiny sets) and, per implementation
  (the NumPy reference, the engine, PyTorch when installed), the zero-argument calls that are timed.
- `timing`: one thread count for every implementation (`SameThreads`), interleaved timing, the float32 matmul
  rate that serves as the machine's peak yardstick.
- `machine`: what describes a run (CPU, versions, load average).
- one module per report section: `kernels` (conv2d and pooling, per shape and direction), `scaling` (1 vs N
  threads), `training` (seconds per epoch of the default digits net).
- `report`: the command line, the printed report, JSON, Markdown and the chart. Its `SECTIONS` lists the section
  modules in the order they run; adding a section is one new module in that list (the protocol is described in
  `report.py`).
"""


def main(argv=None):
    """`python -m convengine bench [options]`; returns the exit status."""
    from .report import main as run_report
    return run_report(argv)
