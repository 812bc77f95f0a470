"""`python -m gmamba_ext`: what was built (versions, backends, CUDA archs) and which devices are visible."""
import os
import platform

import torch

import gmamba_ext
from gmamba_ext import ops


def _setting(variable, describe):
    """describe(value of `variable`, "auto" when unset) followed by the setting, or the error a bad value
    raises (the package's readers raise ValueError)."""
    value = os.environ.get(variable) or "auto"
    try:
        return f"{describe(value)} ({variable}={value})"
    except ValueError as error:
        return str(error)


def _per_device(flag, yes, no):
    return ", ".join(f"{d} {yes if flag(torch.device(d)) else no}" for d in ("cpu", "cuda"))


def _save_policy(_):
    from gmamba_ext.gssm_fused import keeps_intermediates

    return _per_device(keeps_intermediates, "yes", "no (recomputed)")


def _lowpass_form(_):
    from gmamba_ext.gssm_fused import lowpass_uses_fft

    return _per_device(lowpass_uses_fft, "FFTs", "DFT matrices")


def _finite_checks(mode):
    from gmamba_ext.finite_checks import finite_checks_enabled

    on = finite_checks_enabled()  # raises on a bad value before the lookup below
    when = {"auto": "under torch.autograd.detect_anomaly", "always": "every call", "never": "off"}[mode]
    return f"{'on' if on else 'off'} now, {when}"


def main():
    print(f"gmamba_ext {gmamba_ext.__version__} (python {platform.python_version()}, torch {torch.__version__}, "
          f"torch CUDA {torch.version.cuda})")
    try:
        from gmamba_ext import _build_info as info
    except ImportError:
        info = None
    if not ops.HAS_EXTENSION:
        print(f"compiled extension: NOT built ({ops._IMPORT_ERROR}); the pure-PyTorch reference is used")
    elif info is not None:
        print(f"built against torch {info.TORCH_VERSION}, CUDA {info.CUDA_VERSION}")
        print(f"compiled backends: {', '.join(info.BACKENDS)}; CUDA archs: {info.CUDA_ARCHS}")
        openmp = getattr(info, "OPENMP", None)
        threads = (f"{torch.get_num_threads()} threads" if openmp
                   else "1 thread (built without OpenMP)" if openmp is False else "threads unknown (older build)")
        lanes = getattr(ops._C, "CPU_SCAN_LANES", None)  # channels per vector (8: AVX2, 16: AVX-512)
        print(f"CPU kernels: {threads}" + (f"; scan vectors of {lanes} channels" if lanes else ""))
        if getattr(info, "SANITIZE", None):
            print(f"built with -fsanitize={info.SANITIZE}: import with the sanitizer runtimes preloaded (README)")
    print(f"gssm keeps xz, x1, z1, relu(pre) for the backward: {_setting('GMAMBA_GSSM_SAVE', _save_policy)}")
    print(f"gssm's FEM low-pass runs as: {_setting('GMAMBA_GSSM_LOWPASS', _lowpass_form)}")
    print(f"NaN / inf checks of the inputs: {_setting('GMAMBA_CHECK_FINITE', _finite_checks)}")
    for device in ("cpu", "cuda"):
        print(f"  kernel for {device}: {'yes' if ops._has_kernel(torch.device(device)) else 'no'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"visible device cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                  f"{p.multi_processor_count} SMs")
    else:
        print("visible devices: cpu only")


if __name__ == "__main__":
    main()
