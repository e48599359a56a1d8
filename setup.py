"""Build of avar_ops._C: C++ sources always; CUDA sources only where they can run or when asked for.

CUDA kernels are compiled when AVAR_CUDA_ARCHS is set (CI does this, so a CUDA compile error fails CI), or
when a GPU is visible at build time (torch.cuda.is_available() or `nvidia-smi -L`); both need a CUDA torch and
nvcc. Otherwise the build is CPU-only and says so in one line.

Environment:
  AVAR_FORCE_CPU=1         build the CPU kernels only, even with a GPU or AVAR_CUDA_ARCHS
  AVAR_CUDA_ARCHS="8.6;12.0" build the CUDA kernels for these compute capabilities (with a visible GPU and no
                           AVAR_CUDA_ARCHS: the visible GPUs' own capabilities)
  AVAR_CPU_CAPABILITY      AVX512 | AVX2 | DEFAULT: the vector ISA of the CPU kernels (default: what torch
                           detects on the build machine)
  AVAR_BUILD_CUDA_EMULATION=1  also build avar_ops._C_emu, the CUDA kernels compiled by the host compiler for
                           an emulated device on the CPU (tests load it with AVAR_EXTENSION=cuda_emulation);
                           needs the CUDA headers, not a GPU or a CUDA torch
  CUDA_HOME                the CUDA toolkit; by default the one the nvcc on PATH belongs to (found through
                           symlinks and wrapper scripts: nvcc reports its own directory), else /usr/local/cuda

A build first removes the extensions it is about to build, so that a failed build leaves nothing importable
behind (an old avar_ops/_C*.so would pass the import check after it).
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys

CUDA_HEADERS = ("cuda_runtime.h", "cuda_bf16.h")


def nvcc_toolkit(nvcc: str):
    """The toolkit an nvcc executable belongs to. nvcc on PATH may be a symlink or a wrapper script that execs the
    real one elsewhere; nvcc itself prints its directory (TOP= / _HERE_=) in a dry run."""
    try:
        run = subprocess.run(
            [nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        run = None
    for line in (run.stderr + run.stdout).splitlines() if run is not None else []:
        if line.startswith("#$ TOP="):  # TOP is the toolkit's root (.../bin/..)
            return os.path.realpath(line[len("#$ TOP=") :].strip())
        if line.startswith("#$ _HERE_="):  # the directory nvcc runs from (.../bin)
            return os.path.dirname(os.path.realpath(line[len("#$ _HERE_=") :].strip()))
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return nvcc_toolkit(nvcc)
    return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def check_cuda_headers(home, why: str):
    """One line, before any compiler runs, when the toolkit lacks the headers the kernels include."""
    missing = [h for h in CUDA_HEADERS if home is None or not os.path.exists(os.path.join(home, "include", h))]
    if missing:
        where = os.path.join(home, "include") if home else "no CUDA toolkit found (no nvcc on PATH, no CUDA_HOME)"
        sys.exit(f"[avar] {why} needs {', '.join(missing)} from a CUDA toolkit, not found in {where}: set CUDA_HOME")


# torch.utils.cpp_extension reads CUDA_HOME when imported; from a wrapper nvcc on PATH it would guess wrong.
if find_cuda_home() is not None:
    os.environ["CUDA_HOME"] = find_cuda_home()

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


def visible_gpu_archs():
    """Compute capabilities of the visible GPUs ("8.6"), from torch or nvidia-smi; empty without a GPU."""
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return sorted(f"{major}.{minor}" for major, minor in caps)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        run = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line.strip() for line in run.stdout.splitlines() if line.strip()}) if run.returncode == 0 else []


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
    the emulated device of csrc/attention/cuda/emulation.h. The kernel sources (and the emulation's self-test
    kernels) are compiled apart, with the thread-sanitizer instrumentation whose hooks emulation.cpp defines: see
    BuildExt."""
    home = os.environ.get("CUDA_HOME")
    check_cuda_headers(home, "AVAR_BUILD_CUDA_EMULATION=1")
    include = os.path.join(home, "include")
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
    sources = cpu_sources() + ["csrc/attention/cuda_dispatch.cpp", "csrc/attention/cuda/emulation.cpp"]
    cxx = cpu_flags() + ["-DAVAR_CUDA_EMULATION", f"-I{include}", "-Wno-unknown-pragmas"]
    ext = CppExtension("avar_ops._C_emu", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    ext.instrumented_sources = wrappers + ["csrc/attention/cuda/emulation_selftest.cpp"]
    ext.instrumented_flags = cxx
    return ext


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

    check_cuda_headers(os.environ.get("CUDA_HOME"), "building the CUDA kernels")
    archs = os.environ.get("AVAR_CUDA_ARCHS") or ";".join(visible_gpu_archs()) or "8.0;9.0"
    print(f"[avar] CUDA kernels for compute capabilities {archs}", file=sys.stderr)
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


def instrumentation_flags(cxx):
    """Thread-sanitizer instrumentation without its runtime: every load and store calls __tsan_readN / __tsan_writeN,
    which emulation.cpp defines; function entry / exit hooks are left out (they cost and say nothing here)."""
    try:
        version = subprocess.run(cxx + ["--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    if "clang" in version:
        return [
            "-fsanitize=thread",
            "-mllvm",
            "-tsan-instrument-func-entry-exit=0",
            "-mllvm",
            "-tsan-instrument-atomics=0",
        ]
    return ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]


def stale(obj, dep, flag_text, stamp):
    """Whether obj must be rebuilt: missing, built with other flags, or older than a file its depfile lists."""
    if not all(os.path.exists(p) for p in (obj, dep, stamp)) or open(stamp).read() != flag_text:
        return True
    text = open(dep).read().replace("\\\n", " ")
    deps = text.split(":", 1)[1].split() if ":" in text else []
    built = os.path.getmtime(obj)
    return any(not os.path.exists(d) or os.path.getmtime(d) > built for d in deps)


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Removes each extension before building it (a failed build must not leave the old one importable), and
    compiles an extension's `instrumented_sources` apart, with instrumentation_flags, into objects it links."""

    def run(self):
        for ext in self.extensions:
            for path in {self.get_ext_fullpath(ext.name), os.path.join(ROOT, self.get_ext_filename(ext.name))}:
                if os.path.exists(path):
                    os.remove(path)
        super().run()

    def build_extension(self, ext):
        sources = getattr(ext, "instrumented_sources", [])
        if sources:
            ext.extra_objects = list(ext.extra_objects or []) + self.compile_instrumented(ext, sources)
        super().build_extension(ext)

    def compile_instrumented(self, ext, sources):
        from concurrent.futures import ThreadPoolExecutor

        cxx = shlex.split(os.environ.get("CXX", "c++"))
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        flags = ["-std=c++17", "-fPIC", abi] + ext.instrumented_flags + instrumentation_flags(cxx)
        out_dir = os.path.join(self.build_temp, "instrumented")
        os.makedirs(out_dir, exist_ok=True)
        jobs = []
        for src in sources:
            obj = os.path.join(out_dir, os.path.basename(src)[: -len(".cpp")] + ".o")
            dep, stamp = obj + ".d", obj + ".flags"
            flag_text = " ".join(cxx + flags)
            fresh = not stale(obj, dep, flag_text, stamp)
            jobs.append((src, obj, dep, stamp, flag_text, fresh))

        def compile_one(job):
            src, obj, dep, stamp, flag_text, fresh = job
            if fresh:
                return
            print(f"[avar] compiling {src} with the emulation's access hooks", file=sys.stderr)
            subprocess.run(cxx + flags + ["-MMD", "-MF", dep, "-c", src, "-o", obj], check=True)
            with open(stamp, "w") as f:
                f.write(flag_text)

        workers = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(compile_one, jobs))
        return [job[1] for job in jobs]


# The trainers live in the top-level training/ folder and install as `avar_train` (a name no other package takes).
TRAIN_PACKAGES = ["avar_train"] + [f"avar_train.{p}" for p in find_packages("training")]

setup(
    packages=find_packages(include=["avar_ops", "avar_ops.*"]) + TRAIN_PACKAGES,
    package_dir={"avar_train": "training"},
    package_data={"avar_train": ["configs/*.yaml", "configs/*.json"], "avar_train.data": ["templates/*"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
