"""Closed-form moments of a ReLU under Gaussian input (paper Sec. 3.1, Theorem 1)."""

from __future__ import annotations

import math
import warnings

import torch

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_A_MAX = 50.0  # beyond |mu/sigma| = 50, Phi and phi are exactly 0/1 even in float64


def _compute_dtype(*ts):
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    # half precision loses T entirely for moderate ratios; compute in float32
    return dt, (torch.float32 if dt in (torch.float16, torch.bfloat16) else dt)


def _ratio(mu, sigma):
    positive = sigma > 0
    safe = torch.where(positive, sigma, torch.ones_like(sigma))
    return positive, safe, (mu / safe).clamp(-_A_MAX, _A_MAX)


def _pdf(a):
    return torch.exp(-0.5 * a * a) * _INV_SQRT_2PI


def _reduce_to(grad, shape):
    """Sum a broadcast gradient back to an input's shape."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    dims = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1)
    return grad.sum(dims, keepdim=True).reshape(shape)  # reshape: a view when it can be


# CPU: pieces of 4M elements (16 MB in fp32; 6 for the paper's 25M-element LeNet batch). Each op
# on a piece is a parallel region whose threads must all arrive: with ~190 pieces of 128K
# (~1,500 regions a step) a step took 18 s when other processes shared the 2 cores, against 3 s
# in 6 pieces and 10 s for plain autograd; alone on one thread both piece sizes took 1.6 s
# (bench/README.md, "ReLU's fp32 kernel")
_CHUNK_ELEMS = 1 << 22


def _row_chunks(t: torch.Tensor):
    """Slices along dim 0 for CPU tensors (memory-bound passes in pieces, without the
    temporaries of a whole batch); one slice on accelerators, where each op is already one
    fused kernel."""
    n = t.shape[0] if t.ndim else 1
    if t.device.type != "cpu" or t.ndim == 0 or t.numel() <= _CHUNK_ELEMS:
        return [...]
    rows = max(1, _CHUNK_ELEMS // max(1, t[0].numel()))
    return [slice(i, i + rows) for i in range(0, n, rows)]


def _rows_of(x: torch.Tensor, sl: slice, ndim: int):
    """x's part of a dim-0 slice of a tensor with `ndim` dims (x may be broadcast)."""
    if sl is ... or x.ndim < ndim or x.shape[0] == 1:
        return x
    return x[sl]


def _moments_into(m, scaled_sigma, ninv, c, e, o) -> None:
    """T(m, sigma) into o, Phi(a) into c and phi(a) into e, with few passes.

    v = -mu / (sigma sqrt 2): Phi(a) = erfc(v) / 2 (accurate in both tails, and
    vectorised, unlike ndtr) and phi(a) = exp(-v^2) / sqrt(2 pi)."""
    torch.mul(m, ninv, out=e)  # e holds v for now
    torch.special.erfc(e, out=c)
    c.mul_(0.5)
    e.square_().neg_().exp_()  # a = +-inf (sigma = 0) gives exp(-inf) = 0
    torch.mul(e, scaled_sigma, out=o)  # sigma phi(a), the 1/sqrt(2 pi) folded into sigma
    o.addcmul_(m, c)
    e.mul_(_INV_SQRT_2PI)


class _ReluMean(torch.autograd.Function):
    """[relu(mu); T(mu, sigma)] stacked along dim 0 (or T alone), with the analytic
    gradients dT/dmu = Phi(a), dT/dsigma = phi(a).

    Written straight into one buffer in cache-sized chunks on CPU: no separate relu,
    no concatenation, and one backward pass for both branches. The regularizer's
    extra cost beyond the second pass through `rest` is this function.
    sigma = 0 needs no special case: a = mu / tiny saturates Phi to the step and phi
    to 0, and sigma * phi = 0 * phi keeps T = relu(mu) exactly (0 at mu = 0)."""

    @staticmethod
    def forward(ctx, mu, sigma, with_relu: bool):
        shape = torch.broadcast_shapes(mu.shape, sigma.shape)
        mu_b = mu.expand(shape)
        ninv = -_INV_SQRT_2 / sigma.clamp_min(torch.finfo(mu.dtype).tiny)  # one image's worth: cheap
        scaled = sigma * _INV_SQRT_2PI
        n = shape[0] if shape else 1
        out = torch.empty(((2 * n,) + tuple(shape[1:])) if with_relu else shape, dtype=mu.dtype, device=mu.device)
        t_part = out[n:] if with_relu else out
        cdf, pdf = torch.empty_like(t_part), torch.empty_like(t_part)
        nd = len(shape)
        for sl in _row_chunks(t_part):
            m = mu_b[sl]
            _moments_into(m, _rows_of(scaled, sl, nd), _rows_of(ninv, sl, nd), cdf[sl], pdf[sl], t_part[sl])
            if with_relu:
                torch.clamp_min(m, 0, out=out[:n][sl])
        # the relu branch's gradient mask is [mu > 0] = [relu(mu) > 0], read from the output:
        # [Phi(a) > 1/2] would be 0 in float32 for 0 < mu < ~1e-7 sigma
        ctx.save_for_backward(cdf, pdf, out[:n] if with_relu else cdf)
        ctx.shapes, ctx.with_relu = (mu.shape, sigma.shape), with_relu
        return out

    @staticmethod
    def backward(ctx, grad, *_):
        cdf, pdf, relu_out = ctx.saved_tensors
        mu_shape, sigma_shape = ctx.shapes
        n = cdf.shape[0] if cdf.ndim else 1
        g_relu, g_t = (grad[:n], grad[n:]) if ctx.with_relu else (None, grad)
        g_mu = torch.empty_like(cdf) if ctx.needs_input_grad[0] else None
        # sigma broadcast over the batch (the regularizer's case): sum its gradient chunk
        # by chunk, never materialising grad * pdf whole
        batch_sum = ctx.needs_input_grad[1] and _reduces_batch(sigma_shape, cdf.shape)
        g_sigma = None
        for sl in _row_chunks(cdf):
            c, gt = cdf[sl], g_t[sl]
            if g_mu is not None:
                gm = g_mu[sl]
                torch.mul(gt, c, out=gm)
                if g_relu is not None:  # relu'(mu) = [mu > 0]
                    gm.addcmul_(g_relu[sl], (relu_out[sl] > 0).to(c.dtype))
            if batch_sum:
                part = (gt * pdf[sl]).sum(0, keepdim=True)
                g_sigma = part if g_sigma is None else g_sigma + part
        if ctx.needs_input_grad[1] and not batch_sum:
            g_sigma = g_t * pdf
        return (_reduce_to(g_mu, mu_shape) if g_mu is not None else None,
                _reduce_to(g_sigma, sigma_shape) if g_sigma is not None else None, None)


def _reduces_batch(small, big) -> bool:
    return len(small) < len(big) or (len(big) > 0 and small[0] == 1 and big[0] != 1)


def relu_and_mean(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """cat([relu(mu), T(mu, sigma)]) along dim 0, computed as one: the input of the
    clean and the expected pass through `rest` in a single buffer (Eq. 1, 3).

    fp32/fp64 activations take the exact kernel; large bf16/fp16 ones (autocast) the fused,
    compiled one below, whose erfc error (< 1.5e-7) is far under half precision's rounding
    (> 1e-3)."""
    if mu.dtype in (torch.float16, torch.bfloat16) and mu.numel() >= _COMPILE_FROM and _compiled.get(
            _fused_forward) is not False:
        return _FusedReluMean.apply(mu, sigma.float())
    _ran.add("exact")
    out_dtype, dt = _compute_dtype(mu, sigma)
    return _ReluMean.apply(mu.to(dt), sigma.to(dt), True).to(out_dtype)


# The half-precision path: one pass over the activations forward and one backward, each
# a single kernel compiled by torch.compile (inductor: C++ on CPU, Triton on GPU). In
# bf16 the exact kernel above, with its fp32 copies and a dozen passes, cost the
# regularizer 4.3x a bf16 baseline step; fused, ~2.1x (bench/README.md). Backward
# recomputes Phi and phi from mu instead of saving them: reading mu again is cheaper
# than writing and reading two fp32 maps of the activations' size.

_AS = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
# elements: below, the exact kernel (uncompiled, the fused maths is 3x slower than it) costs
# less than compiling (~3 s a process with a warm inductor cache, ~25 s cold): the quickstart
# demo's 2.5M-element batches stay exact, the paper's 25M ones are fused
_COMPILE_FROM = 1 << 22
_compiled: dict = {}
# Which kernels computed relu_and_mean in this process, and why compiling failed: the
# kernels agree only to bf16 rounding, so a run's result.json says which ran (kernels_ran).
_ran: set = set()
_compile_error: list = []
_compile_disabled: list = [False]


def kernels_ran() -> dict:
    """{"kernels": those of "compiled", "eager" (the fused maths uncompiled, after a failed
    compile) and "exact" that ran in this process, "compile_error": the failure, or None}."""
    return {"kernels": sorted(_ran), "compile_error": _compile_error[0] if _compile_error else None}


def _erfc_abs(v):
    """(erfc(|v|), exp(-v^2)) by Abramowitz & Stegun 7.1.26: |error| < 1.5e-7, in one
    exp (shared with phi) instead of a vectorised erfc, which made up most of the cost."""
    x = v.abs()
    t = 1.0 / (1.0 + 0.3275911 * x)
    e = torch.exp(-x * x)
    a1, a2, a3, a4, a5 = _AS
    return t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5)))) * e, e


def _cdf_pdf(m, sigma):
    """Phi(a) and phi(a) for a = m / sigma, in fp32; sigma = 0 gives the step (and phi(0) at m = 0)."""
    v = m * (-_INV_SQRT_2) / sigma.clamp_min(torch.finfo(torch.float32).tiny)
    ec, e = _erfc_abs(v)
    cdf = torch.where(v >= 0, 0.5 * ec, 1.0 - 0.5 * ec)  # Phi(a) = erfc(v) / 2, erfc(-x) = 2 - erfc(x)
    return cdf, _INV_SQRT_2PI * e


def _fused_forward(mu, sigma):
    m = mu.float()
    cdf, pdf = _cdf_pdf(m, sigma)
    return torch.cat([torch.relu(mu), (m * cdf + sigma * pdf).to(mu.dtype)])


def _fused_backward(grad, mu, sigma):
    """dL/dmu = g_relu [mu > 0] + g_T Phi(a); dL/dsigma = g_T phi(a), summed to sigma's shape."""
    n = mu.shape[0]
    g_t = grad[n:].float()
    m = mu.float()
    cdf, pdf = _cdf_pdf(m, sigma)
    g_mu = g_t * cdf + torch.where(m > 0, grad[:n].float(), 0.0)
    g_sigma = _reduce_to(g_t * pdf, sigma.shape)
    return g_mu.to(mu.dtype), g_sigma


def _kernel(fn, *args):
    """fn compiled (once per process). If compiling fails (no C++ compiler, say), fn runs
    eagerly this once (the same maths) and relu_and_mean takes the exact kernel from then on."""
    if _compiled.get(fn) is False:
        _ran.add("eager")
        return fn(*args)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
        # TORCH_COMPILE_DISABLE=1: torch.compile gives a wrapper that runs fn eagerly
        _compile_disabled[:] = [bool(torch._dynamo.config.disable)]
    try:
        out = _compiled[fn](*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path is the same maths
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        _compile_error[:] = [f"{type(e).__name__}: {first}".rstrip(": ")]
        warnings.warn(f"torch.compile failed ({_compile_error[0]}); the regularizer's half-precision kernel "
                      "runs uncompiled (slower, same results to bf16 rounding)")
        _compiled[fn] = _compiled[_fused_forward] = False
        _ran.add("eager")
        return fn(*args)
    _ran.add("eager" if _compile_disabled[0] else "compiled")
    return out


class _FusedReluMean(torch.autograd.Function):
    """[relu(mu); T(mu, sigma)] for half-precision mu (sigma in fp32): computed in fp32,
    stored in mu's dtype."""

    @staticmethod
    def forward(ctx, mu, sigma):
        if mu.ndim == 4 and sigma.ndim == 4 and mu.is_contiguous(memory_format=torch.channels_last):
            # sigma in mu's layout: mixed layouts make the fused kernel ~3x slower
            sigma = sigma.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(mu, sigma)
        return _kernel(_fused_forward, mu, sigma)

    @staticmethod
    def backward(ctx, grad):
        mu, sigma = ctx.saved_tensors
        g_mu, g_sigma = _kernel(_fused_backward, grad, mu, sigma)
        return g_mu, g_sigma


def relu_mean(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """T(mu2, sigma2) = E[max(X, 0)] for X ~ N(mu, sigma^2), elementwise (Eq. 1).

    T = mu * Phi(mu/sigma) + sigma * phi(mu/sigma); sigma = 0 gives relu(mu).
    Differentiable in both arguments (dT/dmu = Phi, dT/dsigma = phi); fp16/bf16
    inputs are computed in float32 and returned in their own dtype."""
    mu, sigma = torch.as_tensor(mu), torch.as_tensor(sigma)
    out_dtype, dt = _compute_dtype(mu, sigma)
    return _ReluMean.apply(mu.to(dt), sigma.to(dt), False).to(out_dtype)


def relu_variance(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Var[max(X, 0)] for X ~ N(mu, sigma^2): (mu^2+sigma^2) Phi(a) + mu sigma phi(a) - T^2,
    clamped at 0 (cancellation can make it slightly negative)."""
    mu, sigma = torch.as_tensor(mu), torch.as_tensor(sigma)
    out_dtype, dt = _compute_dtype(mu, sigma)
    mu, sigma = mu.to(dt), sigma.to(dt)
    positive, s, a = _ratio(mu, sigma)
    cdf, pdf = torch.special.ndtr(a), _pdf(a)
    t = mu * cdf + s * pdf
    var = (mu * mu + s * s) * cdf + mu * s * pdf - t * t
    return torch.where(positive, var, torch.zeros_like(var)).clamp_min(0).to(out_dtype)


def safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient at 0, for sigma2 of noise-free units."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def shallow_mean(A, c1, B, c2, mean_x, cov_x):
    """Theorem 1: the exact mean of B relu(A x + c1) + c2 for x ~ N(mean_x, cov_x).

    mu2 = A mean_x + c1, sigma2 = sqrt(diag(A cov_x A^T)), result B T(mu2, sigma2) + c2.
    `cov_x` is a full (n, n) matrix or a vector of n variances; `mean_x` may carry
    leading batch dimensions (..., n)."""
    mu2 = mean_x @ A.transpose(-1, -2) + c1
    n = A.shape[-1]
    if cov_x.ndim == 2 and tuple(cov_x.shape) == (n, n):
        var2 = ((A @ cov_x) * A).sum(-1)  # diag(A cov A^T) without forming p x p
    else:
        var2 = cov_x @ (A * A).transpose(-1, -2)  # Eq. 5: (A . A) sigma_x^2
    mu3 = relu_mean(mu2, safe_sqrt(var2))
    return mu3 @ B.transpose(-1, -2) + c2
