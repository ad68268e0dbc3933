"""Heatmap speed: convlens beside pytorch-grad-cam, measured in one run, printed as ratios.

Full mode (CPU, 2 threads by default; seeded random weights, nothing downloads):

* Grad-CAM, resnet50, batch 8, 224x224, layer4: convlens vs a bare-torch
  baseline (one forward pass plus the backward pass down to layer4 only, no
  parameter gradients: the least any Grad-CAM can do) and vs pytorch-grad-cam's
  ``GradCAM`` on the same batch. convlens twice: ``explain`` on a plan (the
  method alone, as the CLI and the report run each method after one checking
  pass per batch) and a one-off ``explain`` call (on a named layer it settles the
  target on the method's own pass).
* Score-CAM, resnet18, layer4, one image: convlens (exact) vs pytorch-grad-cam's
  ``ScoreCAM`` (its defaults), with the max abs difference of the maps at the
  layer's resolution after the same ReLU + min-max; and the approximate mode
  (``top_k`` channels by variance, Faster Score-CAM) with its error.

Each figure is the median of ``--repeat`` runs, the two sides interleaved so
that load from other processes hits both alike.

    python benchmarks/bench_heatmaps.py            # full, a few minutes on 2 cores
    python benchmarks/bench_heatmaps.py --quick    # tiny model, seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time

import torch
import torchvision
from torch import nn

import convlens as cl


def _timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _interleaved(functions: dict, repeat: int) -> dict[str, tuple[float, object]]:
    """Median time of each function, running them in turn ``repeat`` times."""
    times = {name: [] for name in functions}
    results = {}
    for _ in range(repeat):
        for name, fn in functions.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in functions}


def forward_and_backward_to_layer(net: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The baseline: forward, then the gradient of the top-1 logits down to ``layer`` only."""
    recorded = {}

    def hook(module, inputs, output):
        output = output.detach().requires_grad_()
        recorded["out"] = output
        return output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = net(x)
            score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            grad, = torch.autograd.grad(score, recorded["out"])
    finally:
        handle.remove()
    return grad


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    maps = torch.as_tensor(maps).float().clamp(min=0)
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp(min=1e-12)).view_as(maps)


class _QuickNet(nn.Module):
    """A small GAP classifier for the smoke run."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def bench_gradcam(net, layer_name, x, repeat):
    from pytorch_grad_cam import GradCAM

    layer = dict(net.named_modules())[layer_name]
    frozen = [p.requires_grad for p in net.parameters()]
    peer = GradCAM(net, [layer])
    try:
        def baseline():
            for p in net.parameters():
                p.requires_grad_(False)
            try:
                return forward_and_backward_to_layer(net, layer, x)
            finally:
                for p, flag in zip(net.parameters(), frozen):
                    p.requires_grad_(flag)

        def peer_run():
            with contextlib.redirect_stdout(io.StringIO()):
                return peer(x, targets=None)

        plan = cl.heatmaps.check_request(net, x, ["gradcam"], layer_name)  # the check pass, made once
        results = _interleaved({
            "baseline": baseline,
            "convlens": lambda: cl.explain(net, x, method="gradcam", layer=layer_name),
            "convlens on a plan": lambda: cl.explain(net, method="gradcam", plan=plan),
            "pytorch-grad-cam": peer_run,
        }, repeat)
    finally:
        peer.activations_and_grads.release()
    return results


def bench_scorecam(net, layer_name, x, repeat, top_k):
    from pytorch_grad_cam import ScoreCAM

    layer = dict(net.named_modules())[layer_name]
    peer = ScoreCAM(net, [layer])
    # The peer's maps at the layer's resolution, so both are compared before any resize.
    size = tuple(cl.explain(net, x, method="gradcam", layer=layer_name).raw.shape[-2:])
    peer.get_target_width_height = lambda tensor: size[::-1]

    def peer_run():
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
            return peer(x, targets=None)

    try:
        results = _interleaved({
            "convlens": lambda: cl.explain(net, x, method="scorecam", layer=layer_name, align_corners=True),
            "pytorch-grad-cam": peer_run,
        }, repeat)
        approx_time, approx = _timed(
            lambda: cl.explain(net, x, method="scorecam", layer=layer_name, align_corners=True, top_k=top_k), repeat)
    finally:
        peer.activations_and_grads.release()
    exact_maps = _minmax(results["convlens"][1].raw)
    diff_peer = float((exact_maps - torch.as_tensor(results["pytorch-grad-cam"][1])).abs().max())
    diff_approx = float((exact_maps - _minmax(approx.raw)).abs().max())
    return results, (approx_time, diff_approx), diff_peer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, for the smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=None, help="runs per measurement (default 5, Score-CAM 1)")
    parser.add_argument("--top-k", type=int, default=None, help="channels kept by the approximate Score-CAM")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if args.quick:
        gradcam_net, gradcam_layer, gradcam_x = _QuickNet().eval(), "features.3", torch.randn(2, 3, 32, 32, generator=generator)
        score_net, score_layer, score_x = gradcam_net, "features.3", gradcam_x[:1]
        repeat_g, repeat_s, top_k = args.repeat or 1, args.repeat or 1, args.top_k or 8
    else:
        gradcam_net = torchvision.models.resnet50().eval()
        gradcam_layer, gradcam_x = "layer4", torch.randn(8, 3, 224, 224, generator=generator)
        score_net = torchvision.models.resnet18().eval()
        model = cl.load_model(score_net)
        score_layer, score_x = "layer4", model.preprocess([cl.sample_image("chelsea")])
        repeat_g, repeat_s, top_k = args.repeat or 5, args.repeat or 1, args.top_k or 64

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    grad = bench_gradcam(gradcam_net, gradcam_layer, gradcam_x, repeat_g)
    base, ours, planned, peer = (grad[k][0] for k in ("baseline", "convlens", "convlens on a plan", "pytorch-grad-cam"))
    print(f"\nGrad-CAM  {'quick net' if args.quick else 'resnet50'}, batch {gradcam_x.shape[0]}, "
          f"{gradcam_x.shape[-1]}x{gradcam_x.shape[-2]}, {gradcam_layer} (median of {repeat_g})")
    print(f"  {'forward + backward to layer (baseline)':42s} {base * 1000:9.1f} ms")
    print(f"  {'convlens gradcam, on a plan (method only)':42s} {planned * 1000:9.1f} ms   {planned / base:5.2f}x "
          "baseline (target <= 1.15)")
    print(f"  {'convlens explain, one-off call':42s} {ours * 1000:9.1f} ms   {ours / base:5.2f}x baseline")
    print(f"  {'pytorch-grad-cam GradCAM':42s} {peer * 1000:9.1f} ms   convlens is {peer / ours:5.2f}x faster "
          f"(target >= 2)")

    score, (approx_time, approx_error), diff_peer = bench_scorecam(score_net, score_layer, score_x, repeat_s, top_k)
    ours_s, peer_s = score["convlens"][0], score["pytorch-grad-cam"][0]
    print(f"\nScore-CAM  {'quick net' if args.quick else 'resnet18'}, {score_layer}, one image "
          f"{score_x.shape[-1]}x{score_x.shape[-2]} (median of {repeat_s})")
    print(f"  {'pytorch-grad-cam ScoreCAM':42s} {peer_s * 1000:9.1f} ms")
    print(f"  {'convlens scorecam (exact)':42s} {ours_s * 1000:9.1f} ms   {peer_s / ours_s:5.2f}x faster "
          f"(target >= 1.3); max |map diff| {diff_peer:.2e}")
    print(f"  {f'convlens scorecam top_k={top_k} (approximate)':42s} {approx_time * 1000:9.1f} ms   "
          f"{peer_s / approx_time:5.2f}x faster; max |map diff| vs exact {approx_error:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
