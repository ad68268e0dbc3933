"""Captum's attribution family: convlens beside captum, measured in one run, printed as ratios.

Occlusion on a CNN at 224 px (seeded random weights, nothing downloads): convlens
scores every occluded copy of the image in batches (``batch_size``, channels-last),
captum ``Occlusion`` at its default of one copy per forward pass and at the same
batch (``perturbations_per_eval``). The attributions are compared value by value
(max abs difference relative to captum's largest magnitude) so that the speed is
for identical output. Each figure is the median of ``--repeat`` runs, the sides
interleaved so that load from other processes hits both alike.

LIME and KernelSHAP over the same superpixels (a grid of ``--block`` px squares),
with the same ``--samples`` coalitions (equal seeds draw captum's coalitions):
convlens scores them in batches, captum ``Lime`` (least-squares surrogate, as
convlens) and ``KernelShap`` one per pass by default and at the same batch.

    python benchmarks/bench_attribution.py                  # resnet50, 224 px, window 32, stride 16
    python benchmarks/bench_attribution.py --model resnet18 --window 56 --stride 28
    python benchmarks/bench_attribution.py --quick          # tiny, seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchvision
from captum._utils.models.linear_model import SkLearnLinearRegression
from captum.attr import KernelShap, Lime, Occlusion

import convlens as cl


def _median(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _compare(sides, repeat: int) -> None:
    """Time each ``(name, fn)``, print times, ratios to convlens (the first) and differences to captum's default."""
    rows = [(name, *_median(fn, repeat)) for name, fn in sides]
    reference = rows[1][2]
    print(f"{'':46s} {'time':>9s} {'ratio':>8s} {'max rel. diff':>14s}")
    for name, seconds, result in rows:
        diff = float((result - reference).abs().max() / reference.abs().max())
        print(f"{name:46s} {seconds:8.2f}s {seconds / rows[0][1]:7.2f}x {diff:14.1e}")
    print(f"convlens is {rows[1][1] / rows[0][1]:.2f}x faster than captum's default and "
          f"{rows[2][1] / rows[0][1]:.2f}x captum at the same batch; load {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64, help="occluded copies per forward pass")
    parser.add_argument("--samples", type=int, default=100, help="LIME / KernelSHAP coalitions")
    parser.add_argument("--block", type=int, default=32, help="superpixel side in px (a square grid)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64 px, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.size, args.window, args.stride, args.repeat = "resnet18", 64, 16, 16, 1
        args.samples, args.block = 8, 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = getattr(torchvision.models, args.model)().eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    target = int(net(x).argmax())
    patches = (1 + (args.size - args.window) // args.stride) ** 2
    print(f"occlusion, {args.model} at {args.size} px, window {args.window}, stride {args.stride}: {patches} "
          f"occluded copies; {args.threads} threads, median of {args.repeat}; load {os.getloadavg()[0]:.1f}")

    def ours():
        return cl.explain(net, x, method="occlusion", target=target, window=args.window, stride=args.stride,
                          batch_size=args.batch).attributions

    def captum(batch: int):
        return lambda: Occlusion(net).attribute(x, target=target, sliding_window_shapes=(3, args.window, args.window),
                                                strides=(3, args.stride, args.stride), baselines=0.0,
                                                perturbations_per_eval=batch)

    _compare([("convlens", ours), ("captum, one copy per pass (its default)", captum(1)),
              (f"captum, {args.batch} copies per pass", captum(args.batch))], args.repeat)
    rows = (torch.arange(args.size) // args.block) * -(-args.size // args.block)
    segments = rows.view(-1, 1) + torch.arange(args.size).view(1, -1) // args.block
    for method in ("lime", "kernel_shap"):
        print(f"\n{method}, {args.model} at {args.size} px, {int(segments.max()) + 1} superpixels, "
              f"{args.samples} coalitions; load {os.getloadavg()[0]:.1f}")

        def ours_surrogate(method=method):
            return cl.explain(net, x, method=method, target=target, segments=segments, n_samples=args.samples,
                              seed=0, batch_size=args.batch).attributions

        def captum_surrogate(batch: int, method=method):
            def run():
                torch.manual_seed(0)
                explainer = Lime(net, interpretable_model=SkLearnLinearRegression()) if method == "lime" \
                    else KernelShap(net)
                return explainer.attribute(x, target=target, feature_mask=segments.view(1, 1, *segments.shape),
                                           n_samples=args.samples, perturbations_per_eval=batch)
            return run

        _compare([("convlens", ours_surrogate), ("captum, one coalition per pass (its default)", captum_surrogate(1)),
                  (f"captum, {args.batch} coalitions per pass", captum_surrogate(args.batch))], args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
