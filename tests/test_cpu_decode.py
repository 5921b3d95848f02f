"""The CPU decode kernels: the packed matmul (exact layout round trip, products against float64 numpy for
every row block size and odd shapes, prefill-sized row counts, concurrent calls, bad shapes) and
single-query attention against `layers.attention` (GQA, odd head sizes, masked and empty rows)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mg5jax.models import cpu_decode, layers

needs_kernel = pytest.mark.skipif(not cpu_decode.available(),
                                  reason=f"CPU decode kernels unavailable: {cpu_decode.unavailable_reason()}")


def test_pack_round_trip_and_panel_layout():
    w = np.arange(5 * 37, dtype=np.float32).reshape(5, 37)
    p = cpu_decode.pack(jnp.asarray(w))
    chex.assert_shape(p, (3, 5, 16))
    np.testing.assert_array_equal(np.asarray(p[1, 2]), w[2, 16:32])  # panel 1 = columns 16..31
    np.testing.assert_array_equal(np.asarray(p[2, :, 5:]), 0)  # the last panel's padding
    np.testing.assert_array_equal(np.asarray(p).transpose(1, 0, 2).reshape(5, 48)[:, :37], w)  # the inverse


@needs_kernel
@pytest.mark.parametrize("k, n", [(37, 1), (96, 200), (512, 33)])
def test_packed_matmul_matches_numpy(k, n):
    rng = np.random.default_rng(k + n)
    w = rng.normal(size=(k, n)).astype(np.float32)
    p = cpu_decode.pack(jnp.asarray(w))
    matmul = jax.jit(cpu_decode.packed_matmul, static_argnums=2)
    errors = {}
    # every row-block size of the kernel (1..6), several blocks, prefills (a batch of prompts)
    for shape in [(1,), (2,), (3,), (4,), (5,), (6,), (7,), (2, 4), (13,), (4, 1, 4), (31,), (3, 67)]:
        x = rng.normal(size=shape + (k,)).astype(np.float32)
        y = matmul(jnp.asarray(x), p, n)
        chex.assert_shape(y, shape + (n,))
        chex.assert_type(y, jnp.float32)
        errors[shape] = np.abs(np.asarray(y) - x.astype(np.float64) @ w.astype(np.float64)).max()
    print(f"K={k} N={n} max-abs errors:", {s: f"{e:.1e}" for s, e in errors.items()})
    assert max(errors.values()) <= 1e-4 * np.sqrt(k), errors


@needs_kernel
def test_concurrent_calls_and_packed_linear():
    """Independent products in one program may run at once on XLA's threads (each call shares its
    panels out to the pool); PackedLinear equals the layer it packs, bias included."""
    base = layers.linear(64, 300, ("embed", "mlp"), rngs=nnx.Rngs(0))
    base.bias.set_value(jnp.linspace(-1, 1, 300))
    packed = cpu_decode.PackedLinear(base)
    assert packed.packed.get_metadata()["out_sharding"] == (None, "embed", None)
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 64)).astype(np.float32))

    @nnx.jit
    def four(m, xs):
        return jnp.stack([m(xs[i]) for i in range(4)])

    want = jnp.einsum("bik,kn->bin", xs, base.kernel[...], precision="highest") + base.bias[...]
    for _ in range(3):
        np.testing.assert_allclose(np.asarray(four(packed, xs)), np.asarray(want), atol=1e-4)


def test_packed_linear_takes_fp32_layers_only():
    bf16 = layers.linear(8, 8, ("embed", "mlp"), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="fp32 layer"):
        cpu_decode.PackedLinear(bf16)


@needs_kernel
def test_the_kernel_rejects_mismatched_shapes():
    x = jnp.ones((2, 8), jnp.float32)
    bad = jnp.ones((1, 7, 16), jnp.float32)  # K = 7, not 8
    call = jax.ffi.ffi_call(cpu_decode.TARGET, jax.ShapeDtypeStruct((2, 16), jnp.float32))
    with pytest.raises(Exception, match="mg5jax_packed_matmul: expected x"):
        jax.block_until_ready(jax.jit(call)(x, bad))


@needs_kernel
@pytest.mark.parametrize("b, h, hkv, s, d", [(3, 4, 2, 12, 16), (8, 8, 8, 160, 64), (2, 3, 3, 37, 20)])
def test_decode_attention_matches_the_reference(b, h, hkv, s, d):
    rng = np.random.default_rng(s)
    q = jnp.asarray(rng.normal(size=(b, 1, h, d)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(b, hkv, s, d)).astype(np.float32)) for _ in range(2))
    mask = rng.random((b, 1, 1, s)) < 0.6
    mask[0] = False  # a row with no valid slot (a finished row): every slot weighs the same, as in the reference
    mask[-1, ..., 1:] = False  # a row with one valid slot
    mask = jnp.asarray(mask)
    want = layers.attention(q, k, v, mask=mask, kv_heads_first=True)
    got = jax.jit(cpu_decode.decode_attention, static_argnums=4)(q, k, v, mask, d**-0.5)
    chex.assert_shape(got, (b, 1, h, d))
    err = float(jnp.abs(got - want).max())
    print(f"decode attention B={b} H={h} Hkv={hkv} S={s} D={d}: max-abs error {err:.1e}")
    assert err <= 1e-5
