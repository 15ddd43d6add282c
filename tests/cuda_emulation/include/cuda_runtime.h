// The CUDA emulation stands in for <cuda_runtime.h> in the emulated build.
#pragma once
#include "cuda_emulation.h"
