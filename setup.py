"""Builds gmamba_ext._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc is found.

Environment:
  GMAMBA_CUDA=0|1        force the CUDA kernels off / on (default: on when possible)
  TORCH_CUDA_ARCH_LIST   honoured; with no GPU visible the default is "9.0" (H100/H200)
  GMAMBA_NATIVE=0        build the CPU kernels for a generic x86-64/aarch64 instead of -march=native
  GMAMBA_CPU_LANES=8|16  channels per vector in the CPU scan (default: 16 where the build has AVX-512, else 8)
  GMAMBA_PTXAS_VERBOSE=1 print registers / shared memory / spills of every CUDA kernel
  GMAMBA_SANITIZE=address,undefined
                         compile the C++ sources with those -fsanitize checks, errors fatal (for tests: run
                         Python with the sanitizer runtimes preloaded, as .ci/run does)
  MAX_JOBS               parallel compile jobs (torch's ninja builder)
"""
import glob
import os
import shutil
import subprocess
import sys

import setuptools
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Commands that compile; the others (sdist, egg_info, dist_info) only describe or pack the sources and need
# no torch, so that `python -m build --sdist` works in its isolated environment (MANIFEST.in lists them).
COMPILING_COMMANDS = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "install", "develop",
                      "editable_wheel"}


def fail(message):
    sys.stderr.write(f"\ngmamba_ext build error: {message}\n\n")
    sys.exit(1)


# pyproject.toml's SPDX `license` string needs setuptools >= 77; older ones fail with a schema error that
# names no fix (a Python 3.11 venv starts with setuptools 65, used as is under --no-build-isolation).
if int(setuptools.__version__.split(".")[0]) < 77:
    fail(f"setuptools >= 77 is needed, this environment has {setuptools.__version__}: run\n"
         "    pip install -U 'setuptools>=77'\nthen build again.")

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    torch = None
    if len(sys.argv) <= 1 or COMPILING_COMMANDS & set(sys.argv[1:]):
        fail(
            "PyTorch is not importable in this build environment. gmamba_ext compiles against the torch you "
            "already have: install torch (>= 2.11) first, then run\n"
            "    pip install --no-build-isolation .\n"
            "(plain `pip install .` builds in an isolated environment without your torch)."
        )


def env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        fail(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def find_nvcc():
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def want_cuda():
    forced = env_flag("GMAMBA_CUDA")
    torch_cuda = torch.version.cuda
    nvcc = find_nvcc()
    if forced is False:
        return False
    if forced is True:
        if not torch_cuda:
            fail(f"GMAMBA_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build.")
        if not nvcc:
            fail("GMAMBA_CUDA=1 but nvcc was not found: set CUDA_HOME (e.g. /usr/local/cuda) or put nvcc on PATH.")
        return True
    return bool(torch_cuda and nvcc)


def nvidia_wheel_dirs():
    """Headers/libraries of the nvidia-* wheels that a pip-installed CUDA torch brings (cuBLAS, cuFFT...)."""
    include, lib = [], []
    for site in sys.path:
        for root in glob.glob(os.path.join(site, "nvidia", "cu*")):
            if os.path.isdir(os.path.join(root, "include")):
                include.append(os.path.join(root, "include"))
            if os.path.isdir(os.path.join(root, "lib")):
                lib.append(os.path.join(root, "lib"))
    return include, lib


def cuda_archs():
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
        if not visible:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "(the visible GPUs)")


def write_build_info(with_cuda, archs, openmp, sanitize):
    path = os.path.join(HERE, "gmamba_ext", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n")
        f.write(f"BACKENDS = {('cpu', 'cuda') if with_cuda else ('cpu',)!r}\n")
        f.write(f"CUDA_ARCHS = {archs if with_cuda else None!r}\n")
        f.write(f"OPENMP = {openmp!r}  # CPU kernels compiled with -fopenmp (multi-threaded)\n")
        f.write(f"SANITIZE = {sanitize or None!r}  # -fsanitize checks compiled in (GMAMBA_SANITIZE)\n")


def make_extension():
    with_cuda = want_cuda()
    sources = sorted(glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp-simd honours the lane loops' `omp simd`; -fno-trapping-math lets GCC vectorise the
    # selects and float->int conversion of the scan's exp (no code here relies on FP exceptions).
    cxx = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-fopenmp-simd", "-fno-trapping-math"]
    if env_flag("GMAMBA_NATIVE") is not False:
        cxx.append("-march=native")
    lanes = os.environ.get("GMAMBA_CPU_LANES")
    if lanes:
        if lanes not in ("8", "16"):
            fail(f"GMAMBA_CPU_LANES must be 8 or 16, got {lanes!r}")
        cxx.append(f"-DGMAMBA_CPU_LANES={lanes}")
    link = []
    sanitize = os.environ.get("GMAMBA_SANITIZE")
    if sanitize:
        if not all(check in ("address", "undefined") for check in sanitize.split(",")):
            fail(f"GMAMBA_SANITIZE must be address, undefined or address,undefined; got {sanitize!r}")
        # Fatal on the first report: a sanitizer error must fail the test that caused it.
        cxx += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        link.append(f"-fsanitize={sanitize}")
    # at::parallel_for is inline: in an OpenMP build of torch its `omp parallel` is compiled into our
    # object, and without -fopenmp it silently runs on one thread (every CPU kernel was serial until this).
    # The runtime is the libgomp.so.1 that torch has already loaded (same soname), so there is one pool.
    # Apple clang has no -fopenmp: there the kernels run on one thread (correct, slower).
    if torch.backends.openmp.is_available() and sys.platform != "darwin":
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    include_dirs = [os.path.join(HERE, "csrc")]
    if not with_cuda:
        write_build_info(False, None, "-fopenmp" in link, sanitize)
        return CppExtension("gmamba_ext._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    archs = cuda_archs()
    wheel_include, wheel_lib = nvidia_wheel_dirs()
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++20" if torch_needs_cxx20() else "-std=c++17"]
    if env_flag("GMAMBA_PTXAS_VERBOSE"):
        nvcc.append("-Xptxas=-v")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    write_build_info(True, archs, "-fopenmp" in link, sanitize)
    return CUDAExtension(
        "gmamba_ext._C",
        sources,
        include_dirs=include_dirs + wheel_include,
        library_dirs=wheel_lib,
        define_macros=[("GMAMBA_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


def torch_needs_cxx20():
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 13)


if torch is not None:
    class Build(BuildExtension):
        def run(self):
            try:
                super().run()
            except (subprocess.CalledProcessError, RuntimeError, OSError) as error:
                fail(f"compiling the extension failed ({error}). The compiler output above says why; "
                     "GMAMBA_CUDA=0 builds the CPU kernels only.")

    setup(ext_modules=[make_extension()], cmdclass={"build_ext": Build})
else:  # packing or describing the sources only (see COMPILING_COMMANDS)
    setup()
