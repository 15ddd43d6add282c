// The CUDA emulation stands in for <cuda_bf16.h> in the emulated build.
#pragma once
#include "cuda_emulation.h"
