"""What the report states about the machine: CPU model, cores, library versions, GPU."""

import os
import platform


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def describe():
    import torch

    import noisekernels
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": _version("triton"), "numpy": _version("numpy"),
            "python": platform.python_version(), "gpu": gpu, "build": noisekernels.build_info(),
            "load_average": os.getloadavg()}
