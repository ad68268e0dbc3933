"""Deletion + insertion on one image: how close to the cost of the forward passes themselves?

For one 224x224 image and one map, deletion and insertion with 224 pixels per
step (224 steps, 225 points per curve) are timed on resnet18 (seeded random
weights, nothing downloaded) and compared with

* ``ceil(224 / batch)`` batched forward passes (the issue's yardstick: the
  cost of one curve's worth of images), and
* ``2 * ceil(225 / batch)`` batched forward passes (what two curves of 225
  points need at the least),

all of the same batch size, measured in the same run. With Quantus installed,
its PixelFlipping (deletion alone, one forward pass per step) is timed too.

    python benchmarks/bench_metrics.py              # resnet18, 224 px, batch 64
    python benchmarks/bench_metrics.py --quick      # tiny model, for the test suite
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from torch import nn


def timed(fn, repeats: int) -> float:
    """Least process CPU time of ``repeats`` runs after one warm-up.

    CPU time, not wall time: other jobs on a shared machine stretch wall time
    but not the work done; the least of several runs drops cache disturbances.
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="batch size of every forward pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny model on a 16x16 image (smoke test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from convlens.metrics import deletion, insertion
    from convlens.models.loading import from_module

    torch.manual_seed(0)
    if args.quick:
        module, size, repeats = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                              nn.Flatten(), nn.Linear(4, 3)), 16, 1
    else:
        import torchvision

        module, size, repeats = torchvision.models.resnet18(weights=None), 224, args.repeats
    module.eval()
    model = from_module(module, input_size=size)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    heatmap = torch.rand(1, size, size, generator=torch.Generator().manual_seed(2))
    step = size  # 224 px per step at 224 x 224: 224 steps, 225 points per curve
    points = math.ceil(size * size / step) + 1
    batch = torch.randn(args.batch, 3, size, size)

    def ours():
        deletion(model, x, heatmap, targets=0, step=step, batch_size=args.batch)
        insertion(model, x, heatmap, targets=0, step=step, batch_size=args.batch)

    def forwards(count: int):
        def run():
            with torch.no_grad():
                for _ in range(count):
                    module(batch)
        return run

    yardstick = math.ceil((points - 1) / args.batch)
    minimum = 2 * math.ceil(points / args.batch)
    results = {"ours_s": timed(ours, repeats), "yardstick_s": timed(forwards(yardstick), repeats),
               "minimum_s": timed(forwards(minimum), repeats),
               "ours_deletion_s": timed(lambda: deletion(model, x, heatmap, targets=0, step=step,
                                                         batch_size=args.batch), repeats)}
    print(f"deletion + insertion, {size}x{size}, {points - 1} steps, batch {args.batch}, "
          f"{args.threads} threads, CPU seconds, least of {repeats}")
    print(f"  {yardstick} forward passes (ceil({points - 1}/batch))   {results['yardstick_s']:8.3f} s")
    print(f"  {minimum} forward passes (2*ceil({points}/batch))  {results['minimum_s']:8.3f} s")
    print(f"  convlens deletion alone               {results['ours_deletion_s']:8.3f} s   "
          f"ratio to the {yardstick} passes {results['ours_deletion_s'] / results['yardstick_s']:.2f}")
    print(f"  convlens deletion + insertion         {results['ours_s']:8.3f} s   "
          f"ratio to the {yardstick} passes {results['ours_s'] / results['yardstick_s']:.2f}, "
          f"to the {minimum} passes {results['ours_s'] / results['minimum_s']:.2f}")
    try:
        import numpy as np
        import quantus
    except ImportError:
        quantus = None
    if quantus is not None and not args.quick:
        # Quantus ranks (channel, pixel) features and wants a step dividing H*W: 448 features = 149 1/3
        # pixels per step, 336 steps, one forward pass of one image per step. Compared per step.
        features = 448
        quantus_steps = 3 * size * size // features
        metric = quantus.PixelFlipping(features_in_step=features, perturb_baseline=0.0, normalise=False,
                                       disable_warnings=True)
        attribution = heatmap.unsqueeze(1).repeat(1, 3, 1, 1).numpy()

        def peer():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                metric(model=module, x_batch=x.numpy(), y_batch=np.array([0]), a_batch=attribution,
                       device="cpu", softmax=True)

        results["quantus_deletion_s"] = timed(peer, 1)
        ours_per_step = results["ours_deletion_s"] / points
        peer_per_step = results["quantus_deletion_s"] / quantus_steps
        print(f"  Quantus PixelFlipping (deletion only, {quantus_steps} steps) {results['quantus_deletion_s']:8.3f} s"
              f" = {1000 * peer_per_step:.1f} ms/step; convlens deletion ({points} points) "
              f"{results['ours_deletion_s']:.3f} s = {1000 * ours_per_step:.1f} ms/step: "
              f"{peer_per_step / ours_per_step:.1f}x")
    return results


if __name__ == "__main__":
    main()
