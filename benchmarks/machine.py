"""The facts that identify the machine of a benchmark run."""

import os
import platform
from pathlib import Path

import keras
import tensorflow as tf


def machine_info() -> dict:
    """Return the CPU count and model, the library versions and the current load."""
    cpu_model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
    }
