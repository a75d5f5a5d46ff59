"""What describes a benchmark run: the processor, the library versions, convengine's build, the load average."""
import os
import platform
import subprocess

import numpy as np

from .._kernels import build_info
from .._threads import _usable_cores
from .timing import torch_module


def machine_info(n_threads):
    info = {
        "platform": platform.platform(), "processor": cpu_model(), "python": platform.python_version(),
        "numpy": np.__version__, "cpus": os.cpu_count(), "threads": n_threads, "convengine": build_info(),
    }
    torch = torch_module()
    info["torch"] = torch.__version__ if torch else None
    info["load_average"] = load_average()
    return info


def usable_cores():
    """The cores this process may use (affinity, cgroup quota)."""
    return _usable_cores()


def load_average():
    """1-minute load average: on a shared machine, a run started under load is not worth comparing."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lscpu():
    """`lscpu` lines that describe the processor, where the command exists."""
    keep = ("Model name", "Architecture", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
            "L1d cache", "L2 cache", "L3 cache", "Hypervisor vendor")
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in text.splitlines() if line.split(":")[0].strip() in keep]
