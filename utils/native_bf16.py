"""Print ``bf16`` when this machine runs bfloat16 matrix products natively, else ``fp32``.

    python utils/native_bf16.py          # run_example.sh uses it to pick the quick rows' training precision

Native means: a CUDA GPU that supports bf16, or (with no GPU) a CPU with the AVX512-BF16 or AMX-BF16
instructions, where oneDNN's bf16 kernels are fast (measured on a 2-core AVX512-BF16 CPU: a forward and
backward of multilingual-e5-small over 96 sequences of 28 tokens took 3.45 s in fp32, 1.80 s in bf16
autocast). Elsewhere bf16 is emulated and can be slower than fp32.
"""
import torch


def native_bf16():
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: no cheap way to tell, stay in fp32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


if __name__ == "__main__":
    print("bf16" if native_bf16() else "fp32")
