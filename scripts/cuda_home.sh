# Sourced by setup_env.sh and test.sh: cuda_home prints the CUDA toolkit the build will use, by setup.py's rule:
# CUDA_HOME when set, else the toolkit the nvcc on PATH belongs to (nvcc may be a symlink or a wrapper script
# that execs the real one elsewhere: its dry run names the directory it runs from), else /usr/local/cuda.
cuda_home() {
  if [ -n "${CUDA_HOME:-}" ]; then
    echo "$CUDA_HOME"
    return
  fi
  if command -v nvcc >/dev/null 2>&1; then
    local here
    here=$(nvcc -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
    if [ -n "$here" ]; then
      dirname "$(readlink -f "$here")"
      return
    fi
    dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"
    return
  fi
  echo /usr/local/cuda
}
