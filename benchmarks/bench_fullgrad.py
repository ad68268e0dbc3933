"""FullGrad speed: convlens beside one forward + backward pass and beside pytorch-grad-cam's ``FullGrad``.

FullGrad needs the target's gradient at the input and at the output of every
Conv2d/BatchNorm2d: one forward and one backward pass to the input. The
baseline is exactly that in bare torch (parameters frozen, so no parameter
gradients; ``torch.autograd.grad`` to the input only); what convlens adds over
it is the hooks on every bias layer and the rescaling and upsampling of their
maps. The issue asks for at most 1.3x the baseline. pytorch-grad-cam's
``FullGrad`` runs ``.backward()`` with parameter gradients and rescales each
channel in NumPy/OpenCV. The maps of the two are compared too (max abs
difference after min-max, at the input's resolution, convlens with
``biases="exact"``, the peer's layer choice; on torchvision models both read the
same layers).

Each figure is the median of ``--repeat`` runs, the sides interleaved so that load
from other processes hits all alike; wall and CPU time are printed.

    python benchmarks/bench_fullgrad.py                    # resnet50, batch 4, 224 px: a minute on 2 cores
    python benchmarks/bench_fullgrad.py --arch vgg11 --repeat 3
    python benchmarks/bench_fullgrad.py --quick            # resnet18 at 64 px, seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

import torch
import torchvision

import convlens as cl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_heatmaps import _interleaved  # noqa: E402  (the one interleaved timer: (wall, result, CPU))


def forward_and_backward_to_input(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The baseline: forward, then the gradient of the top-1 logits at the input only (parameters frozen)."""
    flags = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            leaf = x.detach().clone().requires_grad_()
            logits = net(leaf)
            grad, = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), leaf)
    finally:
        for p, flag in zip(net.parameters(), flags):
            p.requires_grad_(flag)
    return grad


def _minmax(maps) -> torch.Tensor:
    maps = torch.as_tensor(maps).float()
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp(min=1e-12)).view_as(maps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="resnet18, batch 2 at 64 px, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.batch, args.size, args.repeat = "resnet18", 2, 64, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = getattr(torchvision.models, args.arch)().eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    from pytorch_grad_cam import FullGrad

    with contextlib.redirect_stdout(io.StringIO()):
        peer = FullGrad(net, [])
    try:
        def peer_run():
            with contextlib.redirect_stdout(io.StringIO()):
                return peer(x, targets=None)

        print(f"FullGrad, {args.arch}, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, "
              f"median of {args.repeat} (load average {os.getloadavg()[0]:.1f})")
        results = _interleaved({
            "baseline": lambda: forward_and_backward_to_input(net, x),
            "convlens": lambda: cl.explain(net, x, method="fullgrad"),
            "convlens exact": lambda: cl.explain(net, x, method="fullgrad", biases="exact"),
            "pytorch-grad-cam": peer_run,
        }, args.repeat)
    finally:
        peer.activations_and_grads.release()
        for p in net.parameters():
            p.grad = None  # the peer's backward filled them
    base_wall, _, base_cpu = results["baseline"]
    print(f"  {'forward + backward to the input':34s} {base_wall * 1000:9.1f} ms wall {base_cpu * 1000:9.1f} ms CPU")
    for name in ("convlens", "convlens exact", "pytorch-grad-cam"):
        wall, _, cpu = results[name]
        print(f"  {name:34s} {wall * 1000:9.1f} ms wall {cpu * 1000:9.1f} ms CPU   "
              f"{wall / base_wall:5.2f}x baseline (CPU {cpu / base_cpu:5.2f}x)")
    ours, peer_wall = results["convlens exact"], results["pytorch-grad-cam"][0]
    gap = float((ours[1].maps - _minmax(results["pytorch-grad-cam"][1])).abs().max())
    print(f"  convlens is {peer_wall / results['convlens'][0]:.2f}x faster than pytorch-grad-cam; "
          f"max |map diff| (biases='exact') {gap:.2e}")
    print(f"  (load average after: {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
