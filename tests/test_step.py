"""``SkipOnSpike`` and ``clipped_step``: skip decisions as OLMo-core's rule makes them, a skipped step
bit-identical to no step, the clip coefficient inside the fused optimizer's pass within a derived bound
of clip-then-step, GradScaler's Inf/NaN handling kept, resume from a checkpoint, no host
synchronisation, and bad arguments refused before anything changes.

Gradients here are synthetic and independent of the parameters (as in ``bench/optim_step.py``), so a
difference in one step's update adds to the parameters' difference without feeding back into later
gradients: the bounds below add up per step.
"""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

import fastclip

ULP_FP32 = 2.0**-23  # relative spacing of float32 at 1


def reference_decisions(values: list[float], window: int, sigma: float, min_history: int) -> list[bool]:
    """The skip rule written from its definition (OLMo-core's SkipStepAdamW, ../shared/CLIPPING-METHODS.md),
    on host floats with Python's statistics: skip iff ``x - mean > sigma * stdev`` over the last
    ``window`` values, once ``min_history`` are held counting ``x``. fastclip's stated deviation: a
    non-finite value skips and is not recorded."""
    history, decisions = [], []
    for x in values:
        if not math.isfinite(x):
            decisions.append(True)
            continue
        held = history[-window:]
        skip = len(held) + 1 >= min_history and x - statistics.fmean(held) > sigma * statistics.stdev(held)
        decisions.append(skip)
        history.append(x)
    return decisions


def norm_sequence(steps: int = 300, seed: int = 0) -> list[float]:
    """Float32 norms around 1 with spikes: before the rule acts (step 40), two in a row (80, 81), a
    large one (150), Inf and NaN (200, 201), a dip (220, must not skip), a moderate one (260)."""
    g = torch.Generator().manual_seed(seed)
    norms = (1.0 + 0.05 * torch.randn(steps, generator=g)).float()
    for step, value in {40: 30.0, 80: 40.0, 81: 40.0, 150: 50.0, 200: math.inf, 201: math.nan, 220: 0.01,
                        260: 2.0}.items():
        norms[step] = value
    return norms.tolist()


def test_skip_decisions_match_the_reference_rule():
    norms = norm_sequence()
    losses = [2.0 + 0.01 * math.sin(i) for i in range(len(norms))]
    losses[120] = 9.0  # a loss spike alone must skip too
    skip = fastclip.SkipOnSpike()
    got = [bool(skip.update(torch.tensor(n), torch.tensor(l))) for n, l in zip(norms, losses)]
    by_norm, by_loss = reference_decisions(norms, 128, 6.0, 64), reference_decisions(losses, 128, 6.0, 64)
    expected = [a or b for a, b in zip(by_norm, by_loss)]
    assert got == expected
    skipped = [i for i, s in enumerate(expected) if s]
    assert {80, 81, 120, 150, 200, 201}.issubset(skipped) and 40 not in skipped and 220 not in skipped, skipped
    assert int(skip.steps) == len(norms)
    assert int(skip.skipped_steps) == len(skipped)
    assert int(skip.last_skipped_step) == skipped[-1]


@pytest.mark.parametrize("window, sigma, min_history", [(16, 3.0, 8), (4, 1.5, 3), (32, 2.0, 33)])
def test_skip_decisions_match_the_reference_rule_for_other_settings(window, sigma, min_history):
    norms = norm_sequence(seed=window)
    skip = fastclip.SkipOnSpike(window=window, sigma=sigma, min_history=min_history)
    got = [bool(skip.update(torch.tensor(n))) for n in norms]
    assert got == reference_decisions(norms, window, sigma, min_history)


def test_megatron_threshold_alone_and_with_the_statistical_rule():
    """Megatron-LM's grad_norm_skip_threshold: skip iff norm > threshold (strict; fastclip also skips
    non-finite norms, which Megatron's comparison lets through)."""
    norms = norm_sequence()
    norms[230] = 2.0  # equal to the threshold: proceeds
    alone = fastclip.SkipOnSpike(sigma=None, norm_threshold=2.0)
    assert [bool(alone.update(torch.tensor(n))) for n in norms] == [not n <= 2.0 for n in norms]
    both = fastclip.SkipOnSpike(norm_threshold=2.0)
    statistical = reference_decisions(norms, 128, 6.0, 64)
    expected = [s or not n <= 2.0 for s, n in zip(statistical, norms)]
    assert [bool(both.update(torch.tensor(n))) for n in norms] == expected
    assert expected[40] and not statistical[40]  # the threshold acts before the statistical rule does


def test_skip_state_dict_resumes_with_the_same_decisions():
    norms = norm_sequence()
    whole = fastclip.SkipOnSpike(window=32, min_history=16)
    first = [bool(whole.update(torch.tensor(n))) for n in norms]
    part = fastclip.SkipOnSpike(window=32, min_history=16)
    for n in norms[:170]:
        part.update(torch.tensor(n))
    saved = copy.deepcopy(part.state_dict())
    resumed = fastclip.SkipOnSpike(window=32, min_history=16)
    resumed.load_state_dict(saved)
    assert [bool(resumed.update(torch.tensor(n))) for n in norms[170:]] == first[170:]
    for key, value in resumed.state_dict().items():
        expected = whole.state_dict()[key]
        assert torch.equal(value, expected) if isinstance(value, torch.Tensor) else value == expected, key


def test_skip_state_dict_format_is_stable():
    """Slots of the window not yet written are saved as 0 (as every release has saved them), and a
    state saved part-way, whatever those slots hold, resumes with the uninterrupted run's decisions
    for the norm and the loss alike."""
    norms, losses = norm_sequence(), [2.0 + 0.01 * math.sin(i) for i in range(300)]
    losses[20] = 9.0
    whole = fastclip.SkipOnSpike(window=32, min_history=16)
    first = [bool(whole.update(torch.tensor(n), torch.tensor(l))) for n, l in zip(norms, losses)]
    part = fastclip.SkipOnSpike(window=32, min_history=16)
    for n, l in zip(norms[:10], losses[:10]):
        part.update(torch.tensor(n), torch.tensor(l))
    saved = part.state_dict()
    for name in ("norms", "losses"):
        assert int(saved[f"{name}.count"]) == 10
        assert torch.equal(saved[f"{name}.values"][10:], torch.zeros(22, dtype=torch.float64)), name
        saved[f"{name}.values"][10:] = 123.0  # junk where nothing was written: must be ignored
    resumed = fastclip.SkipOnSpike(window=32, min_history=16)
    resumed.load_state_dict(saved)
    assert [bool(resumed.update(torch.tensor(n), torch.tensor(l))) for n, l in zip(norms[10:], losses[10:])] == first[10:]


def test_skip_update_is_a_few_device_ops():
    """On a GPU every op of update() is a kernel launch, paid on each step: the norm and the loss are
    tested by the same ops (36 kernels with both and a threshold; over 80 when they were tested
    one after the other)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):  # ops that run a kernel: views (slice, unsqueeze, ...) do not
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.count += not func.is_view
            return func(*args, **(kwargs or {}))

    skip = fastclip.SkipOnSpike(norm_threshold=10.0)
    for loss in (None, torch.tensor(2.0)):
        CountOps.count = 0
        with CountOps():
            skip.update(torch.tensor(1.0), loss)
        assert CountOps.count <= 40, (loss, CountOps.count)


def test_skip_refuses_bad_settings_and_foreign_state():
    for kwargs in ({"window": 1}, {"window": 8.0}, {"sigma": 0.0}, {"sigma": math.nan}, {"min_history": 2},
                   {"window": 8, "min_history": 10}, {"sigma": True}, {"norm_threshold": 0.0},
                   {"norm_threshold": math.inf}):
        with pytest.raises(ValueError):
            fastclip.SkipOnSpike(**kwargs)
    skip = fastclip.SkipOnSpike(window=8, min_history=4)
    for n in (1.0, 1.1, 0.9):
        skip.update(torch.tensor(n))
    before = copy.deepcopy(skip.state_dict())
    with pytest.raises(ValueError, match="window"):
        skip.load_state_dict(fastclip.SkipOnSpike(window=16, min_history=4).state_dict())
    with pytest.raises(ValueError, match="lacks"):
        skip.load_state_dict({"window": 8})
    with pytest.raises(TypeError):
        skip.update(torch.ones(2))
    after = skip.state_dict()
    assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v for k, v in before.items())


# --- clipped_step ---------------------------------------------------------------------------------

SHAPES = [(64, 32), (32,), (16, 64), (64,), ()]


def make_params(seed: int = 0, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in SHAPES]


def synthetic_grads(steps: int, seed: int = 1, spikes: dict[int, float] | None = None) -> list[list[torch.Tensor]]:
    """Per step, one gradient per parameter, independent of the parameters; ``spikes`` multiplies
    (or, for a non-finite value, poisons) the gradients of the given steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads = [torch.randn(shape, generator=g) for shape in SHAPES]
        factor = (spikes or {}).get(step)
        if factor is not None:
            if math.isfinite(factor):
                grads = [x * factor for x in grads]
            else:
                grads[0].view(-1)[3] = factor
        out.append(grads)
    return out


def make_optimizer(kind: str, params, fused: bool = True) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused or None)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-2, fused=fused or None)
    if kind == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.01, fused=fused or None)
    raise ValueError(kind)


def set_grads(params, grads, scale: torch.Tensor | float = 1.0) -> None:
    for p, g in zip(params, grads):
        p.grad = (g * scale).to(p.dtype)


def assert_states_equal(opt_a, params_a, opt_b, params_b) -> None:
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(a, b), f"parameter {i}"
        state_a, state_b = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert state_a.keys() == state_b.keys(), f"parameter {i}: state keys {state_a.keys()} vs {state_b.keys()}"
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"parameter {i}: state {key}"


SPIKES = {70: 40.0, 90: math.inf, 95: 400.0}  # 95 must stand out of a window holding 70


@pytest.mark.parametrize("kind", ["adamw", "sgd_momentum"])
@pytest.mark.parametrize("path, with_scaler", [("clip", False), ("clip", True), ("grad_scale", False),
                                               ("grad_scale", True)])
def test_skipped_steps_are_bit_identical_to_no_step(kind, path, with_scaler, backend):
    """max_norm is never reached, so every path's arithmetic is exact (a division by a power of two
    or by 1) and the whole run must equal torch's loop that simply does not call step() on the
    steps the reference rule skips: parameters, moments, step counts and the scaler's scale."""
    steps, window = 110, 32
    all_grads = synthetic_grads(steps, spikes=SPIKES)
    norms = [math.sqrt(sum(float(g.double().square().sum()) for g in grads)) for grads in all_grads]
    skipped = reference_decisions(norms, window, 6.0, 16)
    assert [i for i, s in enumerate(skipped) if s] == sorted(SPIKES)

    params, ref_params = make_params(), make_params()
    opt, ref_opt = make_optimizer(kind, params), make_optimizer(kind, ref_params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=20) if with_scaler else None
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=20) if with_scaler else None
    skip = fastclip.SkipOnSpike(window=window, min_history=16)
    for step, grads in enumerate(all_grads):
        if with_scaler:
            set_grads(params, grads, scaler.scale(torch.tensor(1.0)))
            set_grads(ref_params, grads, ref_scaler.scale(torch.tensor(1.0)))
        else:
            set_grads(params, grads)
            set_grads(ref_params, grads)
        fastclip.clipped_step(opt, 1e6, scaler=scaler, skip=skip, path=path, backend=backend)
        if with_scaler:
            ref_scaler.unscale_(ref_opt)
            torch.nn.utils.clip_grad_norm_(ref_params, 1e6)
            if not skipped[step]:
                ref_scaler.step(ref_opt)
            scaler.update()
            ref_scaler.update()
            assert scaler.get_scale() == ref_scaler.get_scale(), step
        else:
            torch.nn.utils.clip_grad_norm_(ref_params, 1e6)
            if not skipped[step]:
                ref_opt.step()
        assert_states_equal(opt, params, ref_opt, ref_params)
    assert int(skip.skipped_steps) == len(SPIKES) and int(skip.last_skipped_step) == max(SPIKES)


def _run(kind, path, with_scaler, steps, dtype=torch.float32, max_norm=0.5, fused=True):
    """``steps`` steps of clipped_step on synthetic gradients, every one clipping (norms ~12 > 0.5)."""
    params = make_params(dtype=dtype)
    opt = make_optimizer(kind, params, fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3) if with_scaler else None
    norms = []
    for grads in synthetic_grads(steps):
        set_grads(params, grads, scaler.scale(torch.tensor(1.0)) if with_scaler else 1.0)
        if path.startswith("torch"):  # torch's loop: unscale_, clip_grad_norm_, step
            if with_scaler:
                scaler.unscale_(opt)
            if path == "torch":
                norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
            else:  # "torch, fastclip's norm": torch's scaling by the norm fastclip computes
                norms.append(fastclip.get_total_norm([p.grad for p in params]))
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norms[-1])
            scaler.step(opt) if with_scaler else opt.step()
        else:
            norms.append(fastclip.clipped_step(opt, max_norm, scaler=scaler, path=path))
        if with_scaler:
            scaler.update()
    return params, norms


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("with_scaler", [False, True])
def test_clip_path_equals_torch_bit_for_bit(kind, with_scaler):
    """The "clip" path is fastclip's clip (or unscale_clip_) then the step: bit-identical to torch's
    loop scaling by the same norm. The norm is rounded by fastclip's fused kernel, so it is bounded
    against a float64 run (4 fp32 ulp here, a handful of gradients), not equal to torch's."""
    steps = 12
    params, norms = _run(kind, "clip", with_scaler, steps)
    ref_params, ref_norms = _run(kind, "torch, fastclip's norm", with_scaler, steps)
    _, exact_norms = _run(kind, "torch", with_scaler, steps, dtype=torch.float64)
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    for n, r, exact in zip(norms, ref_norms, exact_norms):
        assert torch.equal(n, r)
        assert abs(float(n) - float(exact)) <= 4 * ULP_FP32 * float(exact)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("with_scaler", [False, True])
def test_coefficient_in_grad_scale_is_within_the_derived_bound_of_clip_then_step(kind, with_scaler):
    """Every step clips. Per gradient element, torch computes fl(g * c); the grad_scale path computes
    fl(g / fl(S / c)), with S the scaler's power-of-two scale (1 without one): both are within
    2^-23 relative of g * c / S (two roundings of 2^-24 against one), so the gradients differ by at
    most 2^-22 relative, about an ulp. SGD moves a parameter by lr * g: per step the parameters then
    differ by at most lr * |g c| * 2^-22 plus one ulp of the parameter (the update's rounding may fall
    the other way). AdamW's update m_hat / (sqrt(v_hat) + eps) is a ratio: relative errors of 2^-22 in
    m and 2^-21 in v give at most 2^-21 + 2^-22 < 2^-20 relative in it, and |m_hat / sqrt(v_hat)| <= 1 /
    sqrt(1 - beta2) ~ 31.6 bounds its size, so per step at most lr * 31.6 * 2^-20 plus one ulp. The
    bounds add over steps because the gradients do not depend on the parameters. The same bound is
    asserted against a float64 run of torch's loop: the float32 rounding of torch's own loop is of the
    same kind and size, so both float32 runs must stay within it of the float64 one."""
    steps, lr = 12, 1e-2
    params, norms = _run(kind, "grad_scale", with_scaler, steps)
    ref_params, ref_norms = _run(kind, "torch", with_scaler, steps)
    exact_params, exact_norms = _run(kind, "torch", with_scaler, steps, dtype=torch.float64)
    grads = synthetic_grads(steps)
    for i, (p, ref, exact) in enumerate(zip(params, ref_params, exact_params)):
        p, ref, exact = p.detach(), ref.detach(), exact.detach()
        ulp = torch.finfo(torch.float32).eps * exact.abs().max().clamp(min=1.0).double()
        if kind == "sgd":
            moved = sum(lr * float(grads[s][i].abs().max()) * min(1.0, 0.5 / float(exact_norms[s]))
                        for s in range(steps))
            bound = moved * 2.0**-22 + steps * ulp
        else:
            bound = steps * (lr * 31.6 * 2.0**-20 + ulp)
        assert float((p.double() - ref.double()).abs().max()) <= bound, f"parameter {i}: against torch's loop"
        assert float((p.double() - exact).abs().max()) <= 2 * bound, f"parameter {i}: against float64"
        assert float((ref.double() - exact).abs().max()) <= 2 * bound, f"parameter {i}: torch against float64"
    for n, r in zip(norms, exact_norms):
        assert abs(float(n) - float(r)) <= 4 * ULP_FP32 * float(r)


def test_auto_path_and_its_choice():
    """auto: the coefficient goes into grad_scale only with an enabled GradScaler and a fused optimizer
    (the write-back of the divided gradient costs more than it saves otherwise; bench/optim_step.py)."""
    from fastclip.step import _choose_path

    params = make_params()
    set_grads(params, synthetic_grads(1)[0])
    grads = [p.grad for p in params]
    fused, plain = make_optimizer("adamw", params), make_optimizer("adamw", params, fused=False)
    assert _choose_path("auto", fused, grads, True, 2.0) == "grad_scale"
    assert _choose_path("auto", fused, grads, False, 2.0) == "clip"
    assert _choose_path("auto", plain, grads, True, 2.0) == "clip"
    assert _choose_path("auto", fused, grads, True, 0.0) == "clip"  # p = 0 is not homogeneous
    with pytest.raises(ValueError, match="fused"):
        _choose_path("grad_scale", plain, grads, True, 2.0)


def test_gradscaler_inf_backs_off_the_scale_and_a_spike_does_not():
    params = make_params()
    opt = make_optimizer("adamw", params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    skip = fastclip.SkipOnSpike(window=8, min_history=4)
    all_grads = synthetic_grads(12, spikes={8: 50.0, 10: math.nan})
    scales = []
    for grads in all_grads:
        set_grads(params, grads, scaler.scale(torch.tensor(1.0)))
        fastclip.clipped_step(opt, 1.0, scaler=scaler, skip=skip)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales[:10] == [2.0**10] * 10  # the spike at 8 skipped the step but kept the scale
    assert scales[10:] == [2.0**9] * 2  # the NaN at 10 halved it
    assert int(skip.skipped_steps) == 2 and int(opt.state[params[0]]["step"]) == 10


@pytest.mark.parametrize("path", ["clip", "grad_scale"])
def test_resume_from_a_checkpoint_mid_run_steps_identically(path):
    steps, cut = 60, 37
    all_grads = synthetic_grads(steps, spikes={45: 40.0, 50: math.inf})

    def new():
        params = make_params()
        opt = make_optimizer("adamw", params)
        return params, opt, torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=5), \
            fastclip.SkipOnSpike(window=16, min_history=8)

    def run(params, opt, scaler, skip, grads_list):
        for grads in grads_list:
            set_grads(params, grads, scaler.scale(torch.tensor(1.0)))
            fastclip.clipped_step(opt, 0.5, scaler=scaler, skip=skip, path=path)
            scaler.update()

    whole = new()
    run(*whole, all_grads)
    first = new()
    run(*first, all_grads[:cut])
    checkpoint = copy.deepcopy({"params": [p.detach() for p in first[0]], "opt": first[1].state_dict(),
                                "scaler": first[2].state_dict(), "skip": first[3].state_dict()})
    resumed = new()
    with torch.no_grad():
        for p, saved in zip(resumed[0], checkpoint["params"]):
            p.copy_(saved)
    resumed[1].load_state_dict(checkpoint["opt"])
    resumed[2].load_state_dict(checkpoint["scaler"])
    resumed[3].load_state_dict(checkpoint["skip"])
    run(*resumed, all_grads[cut:])
    assert_states_equal(whole[1], whole[0], resumed[1], resumed[0])
    assert int(resumed[3].skipped_steps) == 2 and whole[2].get_scale() == resumed[2].get_scale()


class _NoHostReads:
    """Makes every way a CPU tensor's value reaches Python raise, the CPU-side stand-in for
    torch.cuda.set_sync_debug_mode("error"): item(), bool(), float(), int(), tolist(), numpy()."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def refuse(name):
            def method(*args, **kwargs):
                raise AssertionError(f"Tensor.{name} called: a host read of a device value")
            return method

        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse(name))

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("path, with_scaler", [("clip", False), ("clip", True), ("grad_scale", False),
                                               ("grad_scale", True)])
def test_no_host_read_in_a_step(path, with_scaler):
    params = make_params()
    opt = make_optimizer("adamw", params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if with_scaler else None
    skip = fastclip.SkipOnSpike(window=8, min_history=4)
    for step, grads in enumerate(synthetic_grads(12, spikes={9: 40.0})):
        set_grads(params, grads, scaler.scale(torch.tensor(1.0)) if with_scaler else 1.0)
        loss = torch.tensor(1.0 + step / 100)
        with _NoHostReads():
            fastclip.clipped_step(opt, 0.5, scaler=scaler, skip=skip, loss=loss, path=path)
        if with_scaler:
            scaler.update()
    assert int(skip.skipped_steps) == 1


def test_an_optimizer_that_is_not_fused_needs_allow_sync_to_skip():
    params = make_params()
    opt = make_optimizer("adamw", params, fused=False)
    grads = synthetic_grads(12, spikes={10: 40.0})
    skip = fastclip.SkipOnSpike(window=8, min_history=4)
    set_grads(params, grads[0])
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="allow_sync"):
        fastclip.clipped_step(opt, 0.5, skip=skip)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state and int(skip.steps) == 0
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads[0]))

    ref_params = make_params()
    ref_opt = make_optimizer("adamw", ref_params, fused=False)
    for step, step_grads in enumerate(grads):
        set_grads(params, step_grads)
        set_grads(ref_params, step_grads)
        norm = fastclip.clipped_step(opt, 0.5, skip=skip, allow_sync=True)
        torch.nn.utils.clip_grads_with_norm_(ref_params, 0.5, norm)
        if step != 10:
            ref_opt.step()
        assert_states_equal(opt, params, ref_opt, ref_params)


def test_bad_arguments_are_refused_before_anything_changes():
    params = make_params()
    opt = make_optimizer("adamw", params)
    set_grads(params, synthetic_grads(1)[0])
    grads_before = [p.grad.clone() for p in params]
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.tensor(1.0))
    bad = [
        (dict(max_norm=-1.0), ValueError), (dict(max_norm="1"), TypeError), (dict(norm_type="l2"), ValueError),
        (dict(path="fast"), ValueError), (dict(skip=object()), TypeError), (dict(scaler=object()), TypeError),
        (dict(loss=torch.tensor(1.0)), ValueError),
        (dict(path="grad_scale", norm_type=0.0), ValueError),
    ]
    for kwargs, error in bad:
        kwargs = {"max_norm": 1.0, **kwargs}
        with pytest.raises(error):
            fastclip.clipped_step(opt, **kwargs)
    with pytest.raises(TypeError, match="Optimizer"):
        fastclip.clipped_step(params, 1.0)
    scaler.unscale_(opt)  # then clipped_step would unscale twice
    grads_before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="unscale"):
        fastclip.clipped_step(opt, 1.0, scaler=scaler)
    assert not opt.state and all(torch.equal(p.grad, g) for p, g in zip(params, grads_before))
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
