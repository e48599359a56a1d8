"""Build of avar_ops._C: C++ sources always; CUDA sources only where they can run or when asked for.

CUDA kernels are compiled when AVAR_CUDA_ARCHS is set (CI does this, so a CUDA compile error fails CI), or
when a GPU is visible at build time (torch.cuda.is_available() or `nvidia-smi -L`); both need a CUDA torch and
nvcc. Otherwise the build is CPU-only and says so in one line.

Environment:
  AVAR_FORCE_CPU=1         build the CPU kernels only, even with a GPU or AVAR_CUDA_ARCHS
  AVAR_CUDA_ARCHS="8.0;9.0" build the CUDA kernels for these compute capabilities (with a visible GPU and no
                           AVAR_CUDA_ARCHS: 8.0;9.0)
  AVAR_CPU_CAPABILITY      AVX512 | AVX2 | DEFAULT: the vector ISA of the CPU kernels (default: what torch
                           detects on the build machine)
  AVAR_BUILD_CUDA_EMULATION=1  also build avar_ops._C_emu, the CUDA kernels compiled by the host compiler for
                           an emulated device on the CPU (tests load it with AVAR_EXTENSION=cuda_emulation);
                           needs the CUDA headers, not a GPU or a CUDA torch
  CUDA_HOME                defaults to /usr/local/cuda when that holds nvcc
"""

import glob
import os
import shutil
import subprocess
import sys

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


def nvcc_path():
    home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return nvcc if nvcc is not None and os.path.exists(nvcc) else None


def gpu_visible() -> bool:
    if torch.cuda.is_available():
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        run = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return run.returncode == 0 and "GPU" in run.stdout


def want_cuda() -> bool:
    if os.environ.get("AVAR_FORCE_CPU", "0") == "1":
        print("[avar] AVAR_FORCE_CPU=1: building the CPU kernels only", file=sys.stderr)
        return False
    if os.environ.get("AVAR_CUDA_ARCHS"):
        if torch.version.cuda is None or nvcc_path() is None:
            raise RuntimeError(
                "AVAR_CUDA_ARCHS is set but CUDA kernels cannot be built here: "
                + ("this torch has no CUDA" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)")
            )
        return True
    if not gpu_visible():
        print(
            "[avar] no GPU visible: building the CPU kernels only "
            '(set AVAR_CUDA_ARCHS="8.0;9.0" to compile the CUDA kernels anyway)',
            file=sys.stderr,
        )
        return False
    if torch.version.cuda is None or nvcc_path() is None:
        print(
            "[avar] a GPU is visible but "
            + ("this torch has no CUDA" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)")
            + ": building the CPU kernels only",
            file=sys.stderr,
        )
        return False
    return True


def cpu_flags():
    isa = cpu_capability()
    # -fopenmp: at::parallel_for is a header template; without it the CPU kernels silently run on one thread.
    # The extension then links libgomp.so.1, which resolves to the copy torch has already loaded.
    cxx = ["-O3", "-fno-math-errno", "-fopenmp", f'-DAVAR_CPU_CAPABILITY_NAME="{isa}"'] + CPU_ISA_FLAGS[isa]
    if isa != "DEFAULT":
        cxx += [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]
    return cxx


def cpu_sources():
    sources = sorted(
        glob.glob("csrc/*.cpp") + glob.glob("csrc/attention/*.cpp") + glob.glob("csrc/attention/cpu/*.cpp")
    )
    return [s for s in sources if not s.endswith("cuda_dispatch.cpp")]


def emulation_extension():
    """avar_ops._C_emu: the CPU ops, with float16 / bfloat16 routed to the CUDA host code and kernels compiled for
    the emulated device of csrc/attention/cuda/emulation.h."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    include = os.path.join(home, "include")
    if not os.path.exists(os.path.join(include, "cuda_bf16.h")):
        raise RuntimeError(
            "AVAR_BUILD_CUDA_EMULATION=1 needs the CUDA headers (cuda_runtime.h, cuda_bf16.h), not found in "
            f"{include}: set CUDA_HOME to a CUDA toolkit"
        )
    # The host compiler takes .cpp files only: one two-line file per kernel source, so they compile in parallel.
    wrapper_dir = os.path.join("build", "cuda_emulation")
    os.makedirs(wrapper_dir, exist_ok=True)
    wrappers = []
    for cu in sorted(glob.glob("csrc/attention/cuda/*.cu")):
        path = os.path.join(wrapper_dir, os.path.basename(cu)[: -len(".cu")] + "_emu.cpp")
        text = f'// Generated by setup.py: {cu} for the emulated device.\n#include "{os.path.join(ROOT, cu)}"\n'
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        wrappers.append(path)
    emulation = ["csrc/attention/cuda/emulation.cpp", "csrc/attention/cuda/emulation_selftest.cpp"]
    sources = cpu_sources() + ["csrc/attention/cuda_dispatch.cpp"] + emulation + wrappers
    cxx = cpu_flags() + ["-DAVAR_CUDA_EMULATION", f"-I{include}", "-Wno-unknown-pragmas"]
    return CppExtension("avar_ops._C_emu", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


def extensions():
    built = [extension()]
    if os.environ.get("AVAR_BUILD_CUDA_EMULATION", "0") == "1":
        built.append(emulation_extension())
    return built


def extension():
    cxx = cpu_flags()
    link = ["-fopenmp"]
    sources = cpu_sources()
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
    package_data={"avar_train": ["configs/*.yaml", "configs/*.json"], "avar_train.data": ["templates/*"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
