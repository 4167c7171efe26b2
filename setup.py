"""Builds lightning_lowp._C: the C++ kernels always, the CUDA kernels wherever nvcc is found.

Install after torch with:  pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import setup

# torch guesses the CUDA root from the `nvcc` on PATH, which may be a wrapper script;
# prefer the standard toolkit location when CUDA_HOME is not set.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

with_cuda = os.environ.get("LOWP_NO_CUDA", "0") != "1" and CUDA_HOME is not None
if with_cuda and "TORCH_CUDA_ARCH_LIST" not in os.environ:
    import torch

    # Without it torch guesses the archs from the visible GPUs, and fails where there is none:
    # then build for Hopper, with PTX that newer GPUs compile at load time.
    if not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
sources = sorted(glob.glob("cpp/*.cpp")) + (sorted(glob.glob("cpp/*.cu")) if with_cuda else [])
extension = (CUDAExtension if with_cuda else CppExtension)(
    name="lightning_lowp._C",
    sources=sources,
    define_macros=[("LOWP_WITH_CUDA", None)] if with_cuda else [],
    # -fopenmp: at::parallel_for is an OpenMP loop compiled into our code (without the flag it
    # runs on one thread); -fno-trapping-math lets GCC evaluate both sides of a select, which
    # the vectoriser needs.
    extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-trapping-math"], "nvcc": ["-O3"]},
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
