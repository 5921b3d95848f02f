"""CPU kernels for LLM inference (fp32): a matmul with weights packed once, and single-query attention
for KV-cache decode steps.

XLA:CPU hands every dot to Eigen's GEMM, which repacks the weight matrix on each call: with 1–16 rows
(one token per sequence) that copy costs more than the arithmetic, and a batch-8 decode step of the
benchmark's LLaMA reaches about a third of the memory bandwidth. `PackedLinear` keeps its kernel packed
ahead of time into 16-column panels `[ceil(N/16), K, 16]` (zero-padded; each panel one contiguous
stream) and multiplies by them with a small AVX2/FMA kernel (`cpu_decode.cc`) that XLA calls as an FFI
custom call on its own intra-op threads. Prefills use it too: from 16 to 8192 rows it measured as fast
as XLA's dot on an unpacked kernel or faster (up to 2x at 31 rows, the benchmark's prompt), and XLA
would first have to unpack the panels. `decode_attention` does a decode step's attention
over the cache in one call where XLA runs about ten small programs per layer.

The kernels are compiled with the system C++ compiler (`$CXX`, else `g++`) on first use and kept in
`$MG5JAX_KERNEL_CACHE` (default `~/.cache/mg5jax/kernels`), keyed by their source and the jaxlib
release. `available()` is False, with the reason in `unavailable_reason()`, off x86-64, without AVX2
and FMA, or when the build fails; then `llama.prepare_for_decoding` uses neither. Both are for
inference: they have no gradient.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
TARGET = "mg5jax_packed_matmul"
ATTENTION_TARGET = "mg5jax_decode_attention"
PANEL = 16  # columns per packed panel (cpu_decode.cc's kPanel)


def _cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")),
                set())


def _build() -> pathlib.Path:
    """The compiled kernel library (built now if this source and jaxlib have none in the cache)."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set $CXX)")
    flags = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode() + " ".join([cxx] + flags).encode())
    cache = pathlib.Path(os.environ.get("MG5JAX_KERNEL_CACHE")
                         or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
                         / "mg5jax" / "kernels")
    lib = cache / f"mg5jax_cpu_decode-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: no half-written library
        out = pathlib.Path(tmp) / lib.name
        proc = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{cxx} failed on {SOURCE}:\n{proc.stderr.strip()[-2000:]}")
        os.replace(out, lib)
    log.info("built the CPU decode kernels: %s", lib)
    return lib


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernel is built and registered with XLA; otherwise why not (computed once)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    missing = {"avx2", "fma"} - _cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except (RuntimeError, OSError) as e:
        return f"the kernel did not build or load: {e}"
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.Mg5jaxPackedMatmul), platform="cpu")
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(library.Mg5jaxDecodeAttention), platform="cpu")
    return None


def available() -> bool:
    """Whether the kernels can run here (builds and registers them on first call)."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("CPU decode kernels unavailable: %s", reason)
    return reason is None


def pack(kernel: jax.Array) -> jax.Array:
    """`[K, N]` -> `[ceil(N/16), K, 16]`: column panels, the last one zero-padded."""
    k, n = kernel.shape
    padded = jnp.pad(kernel, ((0, 0), (0, -n % PANEL)))
    return padded.reshape(k, -1, PANEL).transpose(1, 0, 2)


def packed_matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """`x [..., K] @ w[:, :n]` -> `[..., n]` fp32, where `packed = pack(w)`."""
    x = x.astype(jnp.float32)
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32))(x, packed)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """One query per row against a KV cache: q `[B, 1, H, D]`, k/v `[B, Hkv, S, D]` fp32 (H a multiple
    of Hkv), mask `[B, 1, 1, S]` bool -> `[B, 1, H, D]` fp32. As `layers.attention` with `kv_heads_first`:
    masked slots weigh 0, and a row with no unmasked slot weighs every slot equally."""
    return jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q.astype(jnp.float32), k, v, mask, scale=np.float32(scale))


class PackedLinear(nnx.Module):
    """An fp32 `nnx.Linear` (`[..., in] -> [..., out]`) for CPU decoding, its kernel packed by `pack`.

    Build it with `PackedLinear(linear)` after `available()`; the packed weights keep the input axis's
    logical name. Inference only: the FFI call has no gradient.
    """

    @staticmethod
    def accepts(layer: nnx.Module) -> bool:
        """Whether `layer` is a plain `nnx.Linear` with fp32 weights and compute."""
        return type(layer) is nnx.Linear and layer.kernel.dtype == jnp.float32 and layer.dtype in (None, jnp.float32)

    def __init__(self, base: nnx.Linear):
        if not PackedLinear.accepts(base):
            raise TypeError(f"PackedLinear takes an fp32 layer (a plain nnx.Linear); got {type(base).__name__}, kernel "
                            f"{base.kernel.dtype}, compute dtype {base.dtype}")
        kernel = base.kernel[...]
        in_axis, _ = base.kernel.get_metadata().get("out_sharding") or (None, None)
        self.in_features, self.out_features = kernel.shape
        self.packed = nnx.Param(pack(kernel), out_sharding=(None, in_axis, None))
        self.bias = base.bias

    def __call__(self, x: jax.Array) -> jax.Array:
        y = packed_matmul(x, self.packed[...], self.out_features)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y
