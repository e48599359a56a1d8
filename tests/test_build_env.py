"""setup.py's choice of the CUDA toolkit: through a wrapper-script nvcc on PATH to the real toolkit, and a one-line
refusal when the toolkit lacks the headers the kernels include. (The functions are read from setup.py's head,
above the torch import, so that no build runs.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The real nvcc binary (the one on PATH may itself be a wrapper script).
NVCC = "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else shutil.which("nvcc")
HEAD_END = "# torch.utils.cpp_extension reads"


def _setup_head(code: str, path: str, cuda_home: str | None = None):
    """Runs `code` after setup.py's head in a fresh python with PATH = path."""
    head = open(os.path.join(ROOT, "setup.py")).read().split(HEAD_END)[0]
    env = dict(os.environ, PATH=path)
    env.pop("CUDA_HOME", None)
    if cuda_home is not None:
        env["CUDA_HOME"] = cuda_home
    return subprocess.run([sys.executable, "-c", head + "\n" + code], capture_output=True, text=True, env=env)


@pytest.mark.skipif(NVCC is None, reason="needs an nvcc (the CUDA toolkit) on this machine")
def test_wrapper_nvcc_leads_to_the_real_toolkit(tmp_path):
    real = os.path.realpath(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec "{os.path.realpath(NVCC)}" "$@"\n')
    wrapper.chmod(0o755)
    res = _setup_head("print(find_cuda_home())", f"{bin_dir}:/usr/bin:/bin")
    assert res.returncode == 0, res.stderr
    found = res.stdout.strip()
    # Not the wrapper's parent (what torch would guess), but the toolkit that holds the headers.
    assert found != str(tmp_path) and os.path.realpath(found) == real
    assert os.path.exists(os.path.join(found, "include", "cuda_bf16.h"))


def test_a_toolkit_without_headers_stops_the_build_in_one_line(tmp_path):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    res = _setup_head(
        "check_cuda_headers(find_cuda_home(), 'building the CUDA kernels')", "/usr/bin:/bin", str(tmp_path)
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs cuda_bf16.h" in lines[0] and str(tmp_path / "include") in lines[0]
