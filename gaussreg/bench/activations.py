"""What the expected first activation costs beyond ReLU's T (gaussreg.science.activations).

    python -m gaussreg.bench.activations [--shape 100,32,28,28] [--repeat 5]

For a first-layer output of LeNet's shape (mu: the batch's activations, sigma2: one map
broadcast over the batch, as the regularizer has them), times forward + backward of
E[act(X)] in float32 for each first activation, the median of `--repeat` after one warm-up,
next to ReLU's kernel and the plain activation act(mu) (what a baseline step spends there).
One thread unless --threads."""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from gaussreg.science.activations import expected_activation

ACTS = {"ReLU": nn.ReLU(), "LeakyReLU": nn.LeakyReLU(), "ReLU6": nn.ReLU6(), "GELU": nn.GELU(),
        "GELU-tanh": nn.GELU(approximate="tanh"), "Hardswish": nn.Hardswish(), "ELU": nn.ELU(), "SiLU": nn.SiLU()}


def _time(fn, repeat: int) -> float:
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="100,32,28,28")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    shape = tuple(int(v) for v in a.shape.split(","))
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(shape, generator=g).requires_grad_()
    sigma = (0.2 + torch.rand((1,) + shape[1:], generator=g)).requires_grad_()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} thread(s), "
          f"shape {shape}, fp32, forward + backward, median of {a.repeat}")
    print(f"{'activation':<12}{'act(mu) ms':>12}{'E[act] ms':>12}{'x ReLU T':>10}")
    relu_t = None
    for name, act in ACTS.items():
        def plain():
            act(mu).sum().backward()

        def mean():
            expected_activation(act, mu, sigma).sum().backward()
        tp, tm = _time(plain, a.repeat), _time(mean, a.repeat)
        relu_t = relu_t or tm
        print(f"{name:<12}{tp * 1e3:>12.1f}{tm * 1e3:>12.1f}{tm / relu_t:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
