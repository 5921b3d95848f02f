"""Trainable rules, AdamW groups with lr multipliers, the HF warmup/decay schedule, update masks,
frozen parameters and gradient accumulation."""

import jax
import numpy as np
import pytest
from flax import nnx

from _fixtures_training import DIM, HIDDEN, RULES, VOCAB, VOKEN_ROWS, ToyModel, voken_row_mask
from mg5jax.training.optimizer import OptimizerConfig, build_optimizer, linear_warmup_decay, resolve_trainable


def hf_lambda(step: int, warmup: int, total: int) -> float:
    """transformers.get_linear_schedule_with_warmup's lr_lambda."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


@pytest.fixture(scope="module")
def toy_init():
    return nnx.state(ToyModel(rngs=nnx.Rngs(0)))


def fresh_model(state) -> ToyModel:
    model = nnx.eval_shape(lambda: ToyModel(rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda x: x.copy(), state))
    return model


def flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def grads_like(state, values: dict[str, np.ndarray]):
    """A gradient State shaped like `state` with the given arrays."""
    return nnx.from_flat_state([(p, v.replace(values[".".join(map(str, p))])) for p, v in nnx.to_flat_state(state)])


def test_rules_first_match_wins_and_unmatched_is_frozen(toy_init):
    labels = resolve_trainable(toy_init, RULES)
    assert labels == {"embed": 1.0, "head.kernel": 10.0, "head.bias": 10.0, "norm.scale": 1.0,
                      "norm.bias": 1.0, "backbone.kernel": None, "backbone.bias": None}
    labels = resolve_trainable(toy_init, [(r"head\.kernel", None), (r"head\..*", 2.0), (r"embed", 1.0)])
    assert labels["head.kernel"] is None and labels["head.bias"] == 2.0
    assert labels["norm.scale"] is None and labels["backbone.bias"] is None  # unmatched -> frozen
    _, wrt = build_optimizer(fresh_model(toy_init), OptimizerConfig(trainable=RULES))
    assert flat(nnx.state(fresh_model(toy_init), wrt)).keys() == {"embed", "head.kernel", "head.bias", "norm.scale",
                                                                  "norm.bias"}
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(fresh_model(toy_init), OptimizerConfig(trainable=((r"nothing", 1.0),)))
    with pytest.raises(ValueError, match=r"update mask for 'backbone.kernel': not a trainable parameter"):
        build_optimizer(fresh_model(toy_init), OptimizerConfig(trainable=RULES),
                        update_masks={"backbone.kernel": np.ones(1)})
    with pytest.raises(ValueError, match=r"trainable\[0\]: bad regex"):
        OptimizerConfig(trainable=(("head[", 1.0),))
    with pytest.raises(ValueError, match="unknown key 'lr'"):
        OptimizerConfig.from_dict({"lr": 1e-4})


def test_schedule_matches_hf_linear_warmup():
    schedule = linear_warmup_decay(2e-4, warmup_steps=10, total_steps=50)
    for step in (0, 1, 5, 9, 10, 11, 30, 49, 50, 60):
        assert float(schedule(step)) == pytest.approx(2e-4 * hf_lambda(step, 10, 50), rel=1e-6, abs=1e-12), step
    assert float(linear_warmup_decay(1.0, 0, 4)(0)) == 1.0


def reference_adamw(p0, grads, base_lrs, mult, mask, cfg):
    """torch AdamW (decoupled decay) in float64, with a multiplicative mask on the final update."""
    p, m, v = p0.astype(np.float64), 0.0, 0.0
    for t, (g, lr) in enumerate(zip(grads, base_lrs), start=1):
        lr = lr * mult
        m = cfg.b1 * m + (1 - cfg.b1) * g
        v = cfg.b2 * v + (1 - cfg.b2) * g * g
        denom = np.sqrt(v) / np.sqrt(1 - cfg.b2**t) + cfg.eps
        p = p + mask * (-lr * (m / (1 - cfg.b1**t) / denom + cfg.weight_decay * p))
    return p


def test_adamw_groups_decay_and_masks_match_torch_formula(toy_init):
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=6, weight_decay=0.1, trainable=RULES)
    model = fresh_model(toy_init)
    tx, wrt = build_optimizer(model, cfg, update_masks={"embed": voken_row_mask()})
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    opt_paths = {".".join(map(str, p[p.index("mu") + 1:])) for p, _ in nnx.to_flat_state(nnx.state(optimizer))
                 if "mu" in p}
    assert opt_paths == {"embed", "head.kernel", "head.bias", "norm.scale", "norm.bias"}  # frozen: no state
    rng = np.random.default_rng(0)
    trainable = flat(nnx.state(model, wrt))
    grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in trainable.items()} for _ in range(4)]
    for g in grads_seq:
        optimizer.update(model, grads_like(nnx.state(model, wrt), g))
    base_lrs = [cfg.learning_rate * hf_lambda(n, cfg.warmup_steps, cfg.total_steps) for n in range(4)]
    assert base_lrs[0] == 0.0  # as the original, the first update has lr 0
    got = flat(nnx.state(model))
    mults = {"embed": 1.0, "head.kernel": 10.0, "head.bias": 10.0, "norm.scale": 1.0, "norm.bias": 1.0}
    for name, p0 in trainable.items():
        mask = voken_row_mask() if name == "embed" else 1.0
        want = reference_adamw(p0, [g[name] for g in grads_seq], base_lrs, mults[name], mask, cfg)
        # compare the total update; optax's float32 bias correction 1 - 0.999**t is good to ~1e-5
        np.testing.assert_allclose(got[name] - p0, want - p0, rtol=1e-4, atol=1e-9, err_msg=name)
    embed0, rows = trainable["embed"], np.r_[VOKEN_ROWS]
    np.testing.assert_array_equal(np.delete(got["embed"], rows, 0), np.delete(embed0, rows, 0))
    assert not np.allclose(got["embed"][VOKEN_ROWS], embed0[VOKEN_ROWS])
    initial = flat(toy_init)
    for name in ("backbone.kernel", "backbone.bias"):  # frozen: bit-identical, no weight decay
        np.testing.assert_array_equal(got[name], initial[name])


@pytest.mark.parametrize("kind", ["rows", "scattered rows", "elementwise"])
def test_update_masks_keep_state_for_selected_rows_only(toy_init, kind):
    """A mask letting whole rows through keeps AdamW's moments (and the accumulator) for those rows alone;
    scattered rows, a mask on the other axis and an elementwise mask give the same updates as the
    torch formula with the mask multiplied in."""
    mask = {"rows": voken_row_mask(), "scattered rows": np.zeros((VOCAB, 1), np.float32),
            "elementwise": np.zeros((VOCAB, DIM), np.float32)}[kind]
    if kind == "scattered rows":
        mask[[1, 5, 6, 14]] = 1.0
    elif kind == "elementwise":
        mask[12:, :3] = 1.0
    head_mask = np.zeros((1, DIM), np.float32)
    head_mask[0, [2, 3]] = 1.0  # output columns of head.kernel [HIDDEN, DIM]
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=6, weight_decay=0.1, grad_accum_steps=2,
                          trainable=RULES)
    model = fresh_model(toy_init)
    tx, wrt = build_optimizer(model, cfg, update_masks={"embed": mask, "head.kernel": head_mask})
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    state_shapes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(optimizer))}
    rows = {"rows": 4, "scattered rows": 4, "elementwise": VOCAB}[kind]
    for part in ("mu", "nu"):
        assert [s for p, s in state_shapes.items() if p.endswith(f"{part}.embed")] == [(rows, DIM)]
        assert [s for p, s in state_shapes.items() if p.endswith(f"{part}.head.kernel")] == [(HIDDEN, 2)]
    assert [s for p, s in state_shapes.items() if p.endswith("acc_grads.embed")] == [(rows, DIM)]

    rng = np.random.default_rng(3)
    trainable = flat(nnx.state(model, wrt))
    micro = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in trainable.items()} for _ in range(6)]
    for g in micro:
        optimizer.update(model, grads_like(nnx.state(model, wrt), g))
    got = flat(nnx.state(model, wrt))
    mean_grads = [{k: (a[k] + b[k]) / 2 for k in a} for a, b in zip(micro[::2], micro[1::2])]
    base_lrs = [cfg.learning_rate * hf_lambda(n, 0, cfg.total_steps) for n in range(3)]
    for name, m, mult in (("embed", mask, 1.0), ("head.kernel", head_mask, 10.0)):
        want = reference_adamw(trainable[name], [g[name] * m for g in mean_grads], base_lrs, mult, m, cfg)
        np.testing.assert_allclose(got[name] - trainable[name], want - trainable[name], rtol=1e-4, atol=1e-9,
                                   err_msg=name)
        still = np.broadcast_to(m, got[name].shape) == 0
        np.testing.assert_array_equal(got[name][still], trainable[name][still])  # bit-identical


def test_gradient_accumulation_applies_the_mean_every_k(toy_init):
    rng = np.random.default_rng(1)

    def run(k, grads_list):
        cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=4, grad_accum_steps=k, trainable=RULES)
        model = fresh_model(toy_init)
        tx, wrt = build_optimizer(model, cfg)
        optimizer = nnx.Optimizer(model, tx, wrt=wrt)
        for g in grads_list:
            optimizer.update(model, grads_like(nnx.state(model, wrt), g))
        return flat(nnx.state(model, wrt))

    shapes = {k: v.shape for k, v in flat(toy_init).items() if not k.startswith("backbone")}
    g1, g2, g3, g4 = ({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(4))
    accumulated = run(2, [g1, g2, g3, g4])
    direct = run(1, [{k: (g1[k] + g2[k]) / 2 for k in g1}, {k: (g3[k] + g4[k]) / 2 for k in g3}])
    for k in accumulated:
        np.testing.assert_allclose(accumulated[k], direct[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_masked_gradients_count_toward_no_clipping_norm(toy_init):
    """A huge gradient on embedding rows that never move must not shrink the real updates by clipping."""
    rng = np.random.default_rng(2)
    shapes = {k: v.shape for k, v in flat(toy_init).items() if not k.startswith("backbone")}
    grads = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    loud = dict(grads, embed=grads["embed"] + 1e4 * (1 - voken_row_mask()))  # only on the masked rows

    def step(g):
        cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=4, grad_clip_norm=1.0, trainable=RULES)
        model = fresh_model(toy_init)
        tx, wrt = build_optimizer(model, cfg, update_masks={"embed": voken_row_mask()})
        nnx.Optimizer(model, tx, wrt=wrt).update(model, grads_like(nnx.state(model, wrt), g))
        return flat(nnx.state(model, wrt))

    quiet, noisy = step(grads), step(loud)
    for k in quiet:
        np.testing.assert_allclose(noisy[k], quiet[k], rtol=1e-6, atol=1e-7, err_msg=k)
