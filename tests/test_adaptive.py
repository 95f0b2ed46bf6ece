"""Adaptive thresholds (``fastclip.adaptive``) against references written from their definitions
(../shared/CLIPPING-METHODS.md) on host floats, over a recorded run of synthetic gradients with
spikes: the same coefficient every step and the same clipped gradients. The references take the
norm fastclip computed (so both see the same input; fastclip's norm itself is tested elsewhere) and
scale the gradients as the originals do (``grad.mul_(python float)``).

Exactness: fastclip's state is float64 on the device and every operation is the one the reference
does in Python floats (IEEE doubles), in the same order (sums included: a CPU cumsum is sequential),
so coefficients and gradients are asserted bit-identical on CPU.
"""

from __future__ import annotations

import collections
import copy
import math

import pytest
import torch

import fastclip
from fastclip.adaptive import AdaGC, QuantileClip, RunningAverageClip, ZClip
from test_differential import DTYPE_CASES, SHAPE_CASES
from test_step import _NoHostReads

SHAPES = [(32, 16), (16,), (8, 32)]


class RunningAverageReference:
    """The seed tutorial's reading of Pascanu et al. 2013."""

    def __init__(self, alpha=0.95, multiplier=3.0):
        self.alpha, self.multiplier, self.ema = alpha, multiplier, None

    def coefficient(self, n: float) -> float:
        self.ema = n if self.ema is None else self.alpha * self.ema + (1 - self.alpha) * n
        threshold = self.multiplier * self.ema
        return threshold / n if n > threshold else 1.0


class ZClipReference:
    """zclip 1.0.0's ZClip.step with mode 'zscore', the norm given instead of computed."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25,
                 clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False):
        self.alpha, self.z_thresh, self.max_grad_norm, self.eps = alpha, z_thresh, max_grad_norm, eps
        self.warmup_steps, self.clip_option, self.clip_factor = warmup_steps, clip_option, clip_factor
        self.skip_update_on_spike = skip_update_on_spike
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def coefficient(self, n: float) -> float:
        if not self.initialized:
            self.buffer.append(n)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized, self.buffer = True, []
            # torch.nn.utils.clip_grad_norm_(params, max_grad_norm): its coefficient from this norm
            return min(1.0, self.max_grad_norm * (1.0 / (n + 1e-6))) if self.max_grad_norm is not None else 1.0
        std = self.var ** 0.5
        z = (n - self.mean) / (std + self.eps)
        clip_val = None
        if z > self.z_thresh:
            if self.clip_option == "adaptive_scaling":
                clip_val = (self.mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
            else:
                clip_val = self.mean
        adaptive = clip_val if clip_val is not None else n
        effective = min(adaptive, self.max_grad_norm) if self.max_grad_norm is not None else adaptive
        coefficient = effective / (n + 1e-6) if n > effective else 1.0
        if not (clip_val is not None and self.skip_update_on_spike):
            x = clip_val if clip_val is not None else n
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return coefficient


class QuantileReference:
    """autoclip 0.2.1's QuantileClip with global_threshold=True (include_current=False), or the
    paper's rule (include_current=True): torch.quantile of the history, clip_grad_norm_ at it."""

    def __init__(self, quantile=0.9, history=1000, include_current=False):
        self.quantile, self.include_current = quantile, include_current
        self.history = collections.deque(maxlen=history)

    def coefficient(self, n: float) -> float:
        if self.include_current:
            self.history.append(n)
        coefficient = 1.0
        if self.history:
            threshold = float(torch.quantile(torch.tensor(list(self.history), dtype=torch.float64), self.quantile))
            coefficient = float((torch.tensor(threshold, dtype=torch.float64) / (n + 1e-6)).clamp(max=1.0))
        if not self.include_current:
            self.history.append(n)
        return coefficient


class AdaGCReference:
    """pytorch_optimizer 4.1.0's AdaGC clipping, in the gradients' dtype (fp32) as it computes: warm-up
    while step < warmup_steps (global-norm clipping at lambda_abs, gamma the running minimum of the
    clipped norms), then h = min(lambda_rel * max(gamma, eps) / max(||g||, eps), 1) and
    gamma = beta * gamma + (1 - beta) * ||h g||, the clipped gradient's norm read again."""

    def __init__(self, lambda_rel=1.05, beta=0.98, lambda_abs=1.0, warmup_steps=100, eps=1e-8):
        self.lambda_rel, self.beta, self.lambda_abs, self.warmup_steps, self.eps = (lambda_rel, beta, lambda_abs,
                                                                                    warmup_steps, eps)
        self.step, self.gamma = 0, None

    def clip_(self, grads: list[torch.Tensor]) -> None:
        self.step += 1
        if self.gamma is None:
            self.gamma = [torch.empty((1,)) for _ in grads]
        if self.step < self.warmup_steps:
            global_norm = torch.sqrt(sum(torch.linalg.norm(g).pow(2) for g in grads)) + self.eps
            for g, gamma in zip(grads, self.gamma):
                g.mul_(torch.clamp(self.lambda_abs / global_norm, max=1.0))
                gamma.copy_(g.norm() if self.step == 1 else torch.minimum(gamma, g.norm()))
        else:
            for g, gamma in zip(grads, self.gamma):
                h = torch.clamp(self.lambda_rel * gamma.clamp(min=self.eps) / g.norm().clamp(min=self.eps), max=1.0)
                g.mul_(h)
                gamma.mul_(self.beta).add_(g.norm(), alpha=1.0 - self.beta)


def recorded_run(steps: int, seed: int = 0, spikes=None):
    """Per step, gradients ~ N(0, 1) scaled so the norm drifts around 0.6 (below ZClip's default cap
    of 1), with spikes (multipliers) at given steps."""
    g = torch.Generator().manual_seed(seed)
    spikes = {30: 8.0, 31: 6.0, 45: 20.0, 70: 4.0} if spikes is None else spikes
    run = []
    for step in range(steps):
        level = 0.6 * (1 + 0.1 * math.sin(step / 5)) * spikes.get(step, 1.0)
        grads = [torch.randn(s, generator=g) for s in SHAPES]
        total = math.sqrt(sum(float(x.double().square().sum()) for x in grads))
        run.append([x * (level / total) for x in grads])
    return run


def params_with(grads):
    params = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


CASES = {
    "running average": (lambda: RunningAverageClip(), RunningAverageReference),
    "running average, alpha 0.9 x2": (lambda: RunningAverageClip(alpha=0.9, multiplier=2.0),
                                      lambda: RunningAverageReference(0.9, 2.0)),
    "zclip": (lambda: ZClip(), ZClipReference),
    "zclip, no cap, warm-up 10": (lambda: ZClip(max_grad_norm=None, warmup_steps=10),
                                  lambda: ZClipReference(max_grad_norm=None, warmup_steps=10)),
    "zclip, mean, skip update": (lambda: ZClip(clip_option="mean", skip_update_on_spike=True, max_grad_norm=None,
                                               warmup_steps=10),
                                 lambda: ZClipReference(clip_option="mean", skip_update_on_spike=True,
                                                        max_grad_norm=None, warmup_steps=10)),
    "zclip, z 2, factor 0.7": (lambda: ZClip(z_thresh=2.0, clip_factor=0.7, max_grad_norm=3.0, warmup_steps=10),
                               lambda: ZClipReference(z_thresh=2.0, clip_factor=0.7, max_grad_norm=3.0,
                                                      warmup_steps=10)),
    "autoclip": (lambda: QuantileClip(), QuantileReference),
    "autoclip, paper": (lambda: QuantileClip(quantile=0.1, include_current=True),
                        lambda: QuantileReference(quantile=0.1, include_current=True)),
    "autoclip, short history": (lambda: QuantileClip(quantile=0.5, history=7),
                                lambda: QuantileReference(quantile=0.5, history=7)),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_its_reference_on_a_recorded_run(case, backend):
    make, make_reference = CASES[case]
    clipper, reference = make(), make_reference()
    clipper.backend = backend  # the norm and the scaling from this backend's kernels
    clipped_steps = 0
    for step, grads in enumerate(recorded_run(90)):
        params = params_with(grads)
        norm = clipper.clip_(params)
        expected = reference.coefficient(float(norm))
        assert float(clipper.last_coefficient) == expected, f"step {step}"
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g.clone().mul_(expected)), f"step {step}"
        clipped_steps += expected < 1.0
    assert 3 <= clipped_steps < 90, clipped_steps  # the run exercises both branches


@pytest.mark.parametrize("case", ["running average", "zclip", "autoclip, short history"])
def test_state_dict_resumes_with_the_same_coefficients(case):
    make, _ = CASES[case]
    run = recorded_run(60)
    whole, first = make(), make()
    coefficients = []
    for grads in run:
        whole.clip_(params_with(grads))
        coefficients.append(float(whole.last_coefficient))
    for grads in run[:33]:
        first.clip_(params_with(grads))
    resumed = make()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for grads, expected in zip(run[33:], coefficients[33:]):
        resumed.clip_(params_with(grads))
        assert float(resumed.last_coefficient) == expected


@pytest.mark.parametrize("case", CASES)
def test_a_step_reads_nothing_on_the_host(case):
    make, _ = CASES[case]
    clipper = make()
    for grads in recorded_run(40):
        params = params_with(grads)
        with _NoHostReads():
            clipper.clip_(params)


def test_bad_settings_and_foreign_state_are_refused():
    for build in (lambda: RunningAverageClip(alpha=1.0), lambda: RunningAverageClip(multiplier=0),
                  lambda: RunningAverageClip(eps=-1.0), lambda: ZClip(warmup_steps=0), lambda: ZClip(z_thresh=-1),
                  lambda: ZClip(clip_option="median"), lambda: ZClip(max_grad_norm=math.nan),
                  lambda: QuantileClip(quantile=1.0), lambda: QuantileClip(history=0)):
        with pytest.raises(ValueError):
            build()
    clipper = ZClip(warmup_steps=5)
    clipper.clip_(params_with(recorded_run(1)[0]))
    before = copy.deepcopy(clipper.state_dict())
    with pytest.raises(ValueError, match="warmup_steps"):
        clipper.load_state_dict(ZClip(warmup_steps=6).state_dict())
    with pytest.raises(ValueError, match="lacks"):
        clipper.load_state_dict({"alpha": 0.97})
    after = clipper.state_dict()
    assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v for k, v in before.items())


@pytest.mark.parametrize("fused", ["cpp", "triton"])
@pytest.mark.parametrize("case", ["running average", "zclip", "autoclip"])
def test_compiled_step_matches_eager(case, fused):
    """torch.compile(fullgraph=True) of a step that clips adaptively: the same coefficients and
    gradients as eager (the norm and the scaling come from the same fused ops; the threshold
    arithmetic is float64 elementwise, which Inductor does not reorder)."""
    from conftest import require_backend

    require_backend(fused)
    torch._dynamo.reset()
    make, _ = CASES[case]
    eager, compiled_clipper = make(), make()
    eager.backend = compiled_clipper.backend = fused
    compiled = torch.compile(lambda params: compiled_clipper.clip_(params), fullgraph=True)
    for grads in recorded_run(35):
        p_eager, p_compiled = params_with(grads), params_with(grads)
        eager.clip_(p_eager)
        compiled(p_compiled)
        assert float(eager.last_coefficient) == float(compiled_clipper.last_coefficient)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(p_eager, p_compiled))


@pytest.mark.parametrize("warmup_steps", [100, 20])
def test_adagc_matches_its_reference_within_float32_rounding(warmup_steps, backend):
    """The reference computes in float32 and reads each clipped gradient's norm again; fastclip
    computes in float64 and takes ||h g|| as h ||g||. Each step's arithmetic differs by a few float32
    roundings (~1e-7 relative); gamma is an average (beta 0.98) of such values, so the difference
    does not grow: 1e-5 relative bounds it with a margin, while a wrong rule (a missed clip, the
    wrong warm-up or EMA) is off by percents."""
    clipper = AdaGC(warmup_steps=warmup_steps, backend=backend)
    reference = AdaGCReference(warmup_steps=warmup_steps)
    run = recorded_run(110, spikes={30: 8.0, 45: 20.0, 70: 4.0, 104: 10.0})
    clipped = 0
    for step, grads in enumerate(run):
        params = params_with(grads)
        expected = [g.clone() for g in grads]
        clipper.clip_(params)
        reference.clip_(expected)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=0, msg=lambda m: f"step {step}: {m}")
        clipped += bool((clipper.last_coefficient < 1).any())
    for gamma, expected in zip(clipper.gamma.tolist(), reference.gamma):
        assert gamma == pytest.approx(float(expected), rel=1e-5)
    assert clipped >= 4


@pytest.mark.parametrize("bad_step", [5, 15], ids=["in warm-up", "after warm-up"])
def test_adagc_non_finite_gradients_poison_what_the_reference_poisons(bad_step, backend):
    """A NaN in one gradient and an inf in another: in warm-up the global norm is non-finite and the
    reference scales every gradient by it (NaN / 0); after warm-up each gradient has its own
    coefficient, so only the two bad ones (and their thresholds) become NaN and the others go on being
    clipped as before. fastclip must measure the norms without writing, or the whole step is NaN."""
    clipper = AdaGC(warmup_steps=10, backend=backend)
    reference = AdaGCReference(warmup_steps=10)
    for step, grads in enumerate(recorded_run(25)):
        if step in (bad_step, bad_step + 3):
            grads = [g.clone() for g in grads]
            grads[0][0, 0] = math.nan
            grads[1][-1] = math.inf
        params = params_with(grads)
        expected = [g.clone() for g in grads]
        clipper.clip_(params)
        reference.clip_(expected)
        for i, (p, e) in enumerate(zip(params, expected)):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=0, equal_nan=True,
                                       msg=lambda m: f"step {step}, gradient {i}: {m}")
        if step >= bad_step and bad_step >= 10:
            assert torch.isfinite(params[2].grad).all(), f"step {step}: a finite gradient became NaN"
    assert torch.isnan(clipper.gamma[:2]).all()
    assert torch.isfinite(clipper.gamma[2:]).all() == (bad_step >= 10)


def test_adaptive_clippers_refuse_shared_gradients_before_changing_anything():
    """Two gradients that are views of one buffer would be scaled twice: refused before the clipper's
    state or any gradient changes, as fastclip.clip_ refuses them."""
    for make in [RunningAverageClip, ZClip, QuantileClip, lambda: AdaGC(warmup_steps=10)]:
        clipper = make()
        clipper.clip_(params_with([torch.full((4,), 3.0), torch.full((4,), 4.0)]))
        state = copy.deepcopy(clipper.state_dict())
        params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
        shared = torch.full((8,), 5.0)
        params[0].grad, params[1].grad = shared[:4], shared[2:6]
        with pytest.raises(ValueError, match="share memory"):
            clipper.clip_(params)
        assert torch.equal(shared, torch.full((8,), 5.0))
        for key, value in clipper.state_dict().items():
            assert torch.equal(value, state[key]) if isinstance(value, torch.Tensor) else value == state[key]


def test_adagc_state_dict_and_refusals():
    run = recorded_run(40)
    whole, first = AdaGC(warmup_steps=10), AdaGC(warmup_steps=10)
    coefficients = []
    for grads in run:
        whole.clip_(params_with(grads))
        coefficients.append(whole.last_coefficient.clone())
    for grads in run[:17]:
        first.clip_(params_with(grads))
    resumed = AdaGC(warmup_steps=10)
    with pytest.raises(ValueError, match="gamma"):  # 7 gradients said, 3 thresholds held: refused, unchanged
        resumed.load_state_dict({**first.state_dict(), "num_tensors": 7})
    assert resumed.num_tensors is None
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for grads, expected in zip(run[17:], coefficients[17:]):
        resumed.clip_(params_with(grads))
        assert torch.equal(resumed.last_coefficient, expected)
    with pytest.raises(ValueError, match="one threshold per gradient"):
        resumed.clip_(params_with(run[0][:2]))
    for bad in ({"lambda_rel": 0}, {"beta": 1.0}, {"warmup_steps": 0}, {"eps": -1.0}):
        with pytest.raises(ValueError):
            AdaGC(**bad)


def test_adagc_reads_nothing_on_the_host_and_compiles():
    from conftest import require_backend

    clipper = AdaGC(warmup_steps=10)
    for grads in recorded_run(20):
        params = params_with(grads)
        with _NoHostReads():
            clipper.clip_(params)
    require_backend("cpp")
    torch._dynamo.reset()
    eager, compiled_clipper = AdaGC(warmup_steps=10), AdaGC(warmup_steps=10)
    compiled = torch.compile(lambda params: compiled_clipper.clip_(params), fullgraph=True)
    for grads in recorded_run(20):
        p_eager, p_compiled = params_with(grads), params_with(grads)
        eager.clip_(p_eager)
        compiled(p_compiled)
        assert torch.equal(eager.last_coefficient, compiled_clipper.last_coefficient)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(p_eager, p_compiled))


@pytest.mark.parametrize("per_tensor", [False, True], ids=["one coefficient", "one per gradient"])
@pytest.mark.parametrize("dtype", DTYPE_CASES)
@pytest.mark.parametrize("case", SHAPE_CASES)
def test_scale_by_is_torchs_multiplication_and_skips_ones(backend, case, dtype, per_tensor):
    """The clippers' scaling (Backend.scale_by_) gives the bits of torch's mul_ by a 0-dim float64
    tensor on every layout and dtype, 0-dim gradients included (torch multiplies those in double);
    coefficients of 1 leave a gradient untouched, NaN and 0 are applied."""
    from fastclip._dispatch import select_backend
    from harness import assert_same, build
    from test_differential import _specs

    mine, _ = build(_specs(case, dtype))
    grads = [p.grad for p in mine]
    values = [0.3, 1.0, 1 / 3, 0.0, 1.0, math.nan, 0.7]
    coefficients = (torch.tensor([values[i % len(values)] for i in range(len(grads))], dtype=torch.float64)
                    if per_tensor else torch.tensor(1 / 3, dtype=torch.float64))
    expected = [g.clone() for g in grads]
    for i, e in enumerate(expected):
        e.mul_(coefficients[i] if per_tensor else coefficients)
    select_backend(backend, grads, None, operation="scale_by_").scale_by_(grads, coefficients)
    for i, (g, e) in enumerate(zip(grads, expected)):
        assert_same(g, e, f"gradient {i}")
