"""LRP: convlens beside one forward + backward pass of the same model and beside zennit, printed as ratios.

ResNet-50 at 224 px on the CPU (seeded random weights with trained-looking BatchNorm
statistics, nothing downloads), the ``lrp`` composite (zennit's ``EpsilonPlusFlat``
with its ``ResNetCanonizer``). Three timings, each the median of ``--repeat`` runs, the
sides interleaved so that load from other processes hits all alike:

* the floor: one forward pass and the backward pass to the input (the input gradient,
  parameters frozen), which is what a gradient-trick LRP cannot go below;
* convlens ``relevance`` (the registered method's computation, without the map post-processing);
* zennit ``EpsilonPlusFlat`` in its context, the gradient seeded with ``one_hot * output``.

The relevances are compared value by value (max abs difference relative to zennit's
largest magnitude), so the speed is for identical output.

    python benchmarks/bench_lrp.py                   # resnet50, 224 px, 3 repeats
    python benchmarks/bench_lrp.py --model resnet18 --size 112
    python benchmarks/bench_lrp.py --quick           # resnet18 at 64 px, one repeat (the test suite runs this)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torchvision
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

from convlens.heatmaps.base import Request
from convlens.heatmaps.lrp import Composite, relevance
from convlens.heatmaps.lrp_rules import Epsilon, Flat, ZPlus
from convlens.models.loading import from_module


def _median(fn, repeat: int) -> tuple[list[float], torch.Tensor]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def _network(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in net.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.weight.uniform_(0.5, 1.5, generator=generator)
                norm.bias.uniform_(-0.2, 0.2, generator=generator)
                norm.running_mean.uniform_(-0.2, 0.2, generator=generator)
                norm.running_var.uniform_(0.5, 1.5, generator=generator)
    return net


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64 px, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.size, args.repeat = "resnet18", 64, 1
    torch.set_num_threads(args.threads)
    net = _network(args.model)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = int(net(x).argmax())
    model = from_module(net, name=args.model, input_size=args.size)
    composite = Composite(conv=ZPlus(), linear=Epsilon(), first=Flat())
    for p in net.parameters():
        p.requires_grad_(False)  # the floor takes the input gradient only, as LRP does
    print(f"LRP (EpsilonPlusFlat), {args.model} at {args.size} px; {args.threads} threads, median of "
          f"{args.repeat}; load {os.getloadavg()[0]:.1f}")

    def floor():
        leaf = x.clone().requires_grad_()
        grad, = torch.autograd.grad(net(leaf)[0, target], leaf)
        return grad

    def ours():
        return relevance(Request(model, x, [], None, None, target=target), composite)

    def zennit():
        leaf = x.clone().requires_grad_()
        with EpsilonPlusFlat(canonizers=[ResNetCanonizer()]).context(net) as modified:
            output = modified(leaf)
            seed = torch.zeros_like(output)
            seed[0, target] = output[0, target]
            result, = torch.autograd.grad(output, leaf, grad_outputs=seed)
        return result

    sides = {"forward + backward (the floor)": floor, "convlens lrp": ours, "zennit EpsilonPlusFlat": zennit}
    times: dict[str, list[float]] = {name: [] for name in sides}
    results = {}
    for _ in range(args.repeat):  # interleaved
        for name, fn in sides.items():
            run, results[name] = _median(fn, 1)
            times[name] += run
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = results["zennit EpsilonPlusFlat"]
    base = medians["forward + backward (the floor)"]
    print(f"{'':34s} {'time':>9s} {'x floor':>8s} {'max rel. diff to zennit':>24s}")
    for name, seconds in medians.items():
        diff = "" if name.startswith("forward") else f"{float((results[name] - reference).abs().max() / reference.abs().max()):.1e}"
        print(f"{name:34s} {seconds:8.3f}s {seconds / base:7.2f}x {diff:>24s}")
    ours_time, zennit_time = medians["convlens lrp"], medians["zennit EpsilonPlusFlat"]
    print(f"convlens lrp takes {ours_time / base:.2f}x one forward + backward and is "
          f"{zennit_time / ours_time:.2f}x faster than zennit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
