"""Build of avar_ops._C: C++ sources always, CUDA sources when torch has CUDA and nvcc is found.

Environment:
  AVAR_FORCE_CPU=1         build the CPU kernels only
  AVAR_CUDA_ARCHS="8.0;9.0" compute capabilities to compile for (default 8.0;9.0)
  AVAR_CPU_CAPABILITY      AVX512 | AVX2 | DEFAULT: the vector ISA of the CPU kernels (default: what torch
                           detects on the build machine)
  CUDA_HOME                defaults to /usr/local/cuda when that holds nvcc
"""

import glob
import os
import shutil

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    # torch would otherwise guess /usr/local from the nvcc on PATH, which does not link.
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))

CPU_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}


def cpu_capability() -> str:
    wanted = os.environ.get("AVAR_CPU_CAPABILITY")
    if wanted is None:
        detected = torch.backends.cpu.get_cpu_capability()
        wanted = "AVX512" if detected.startswith("AVX512") else ("AVX2" if detected == "AVX2" else "DEFAULT")
    if wanted not in CPU_ISA_FLAGS:
        raise ValueError(f"AVAR_CPU_CAPABILITY must be one of {sorted(CPU_ISA_FLAGS)}, got {wanted!r}")
    return wanted


def want_cuda() -> bool:
    if os.environ.get("AVAR_FORCE_CPU", "0") == "1":
        return False
    if torch.version.cuda is None:
        return False
    home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return nvcc is not None and os.path.exists(nvcc)


def extension():
    isa = cpu_capability()
    # -fopenmp: at::parallel_for is a header template; without it the CPU kernels silently run on one thread.
    # The extension then links libgomp.so.1, which resolves to the copy torch has already loaded.
    cxx = ["-O3", "-fno-math-errno", "-fopenmp", f'-DAVAR_CPU_CAPABILITY_NAME="{isa}"'] + CPU_ISA_FLAGS[isa]
    link = ["-fopenmp"]
    if isa != "DEFAULT":
        cxx += [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/attention/*.cpp") + glob.glob("csrc/attention/cpu/*.cpp"))
    sources = [s for s in sources if not s.endswith("cuda_dispatch.cpp")]
    if not want_cuda():
        return CppExtension("avar_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    archs = os.environ.get("AVAR_CUDA_ARCHS", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cu_sources = sorted(glob.glob("csrc/attention/cuda/**/*.cu", recursive=True))
    sources += ["csrc/attention/cuda_dispatch.cpp"] + cu_sources
    nvcc = [
        "-O3",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "--use_fast_math",
        "-Xptxas=-v" if os.environ.get("AVAR_PTXAS_VERBOSE") == "1" else "-Xptxas=-O3",
        f"--threads={os.environ.get('AVAR_NVCC_THREADS', '2')}",
    ]
    return CUDAExtension(
        "avar_ops._C",
        sources,
        extra_compile_args={"cxx": cxx + ["-DAVAR_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
    )


# The trainers live in the top-level training/ folder and install as `avar_train` (a name no other package takes).
TRAIN_PACKAGES = ["avar_train"] + [f"avar_train.{p}" for p in find_packages("training")]

setup(
    packages=find_packages(include=["avar_ops", "avar_ops.*"]) + TRAIN_PACKAGES,
    package_dir={"avar_train": "training"},
    package_data={"avar_train": ["configs/*.yaml", "configs/*.json", "templates/*"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
