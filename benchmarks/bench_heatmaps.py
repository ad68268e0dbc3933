"""Heatmap speed: convlens beside pytorch-grad-cam, measured in one run, printed as ratios.

Full mode (CPU, 2 threads by default; seeded random weights, nothing downloads):

* Grad-CAM, resnet50, batch 8, 224x224, layer4: convlens vs a bare-torch
  baseline (one forward pass plus the backward pass down to layer4 only, no
  parameter gradients: the least any Grad-CAM can do) and vs pytorch-grad-cam's
  ``GradCAM`` on the same batch. convlens twice: ``explain`` on a plan (the
  method alone, as the CLI and the report run each method after one checking
  pass per batch) and a one-off ``explain`` call (on a named layer it settles the
  target on the method's own pass).
* Score-CAM, resnet18, layer4, one image: convlens (exact, its default batch
  size) vs pytorch-grad-cam's ``ScoreCAM`` (its defaults: batch 16), at both mask
  settings: pytorch-grad-cam's own (``align_corners=True``) and convlens' default
  (``align_corners=False``, given to the peer by swapping its upsampler for the
  run), each with the max abs difference of the maps at the layer's resolution
  after the same ReLU + min-max. Then the floor: the masked forward passes alone,
  bare torch, as convlens runs them (its distinct masks, channels-last, its batch)
  and as the peer runs them (every channel, channels-first, batch 16); the ratio
  of the two floors is the most any exact Score-CAM that runs those passes can
  gain. Last, a bound from the hardware: the passes' convolution and matmul FLOPs
  at this CPU's float32 matmul peak. And the approximate mode (``top_k``
  channels by variance, Faster Score-CAM) with its error.

Each figure is the median of ``--repeat`` runs, the sides interleaved so that
load from other processes hits all alike; the load average is printed before
and after, since a busy machine favours the channels-last passes.

    python benchmarks/bench_heatmaps.py            # full, a few minutes on 2 cores
    python benchmarks/bench_heatmaps.py --only scorecam --repeat 3
    python benchmarks/bench_heatmaps.py --quick    # tiny model, seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import convlens as cl
from convlens.heatmaps.base import normalise
from convlens.heatmaps.perturbation import CPU_BATCH_PIXELS, scorecam_batch_size


def _timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _interleaved(functions: dict, repeat: int) -> dict[str, tuple[float, object, float]]:
    """``(median wall time, last result, median CPU time)`` of each function, run in turn ``repeat`` times.

    The process's CPU time counts only the cycles it got, so on a shared machine its ratios wander
    less than wall time's (the OpenMP threads' spin-waiting counts too, unless OMP_WAIT_POLICY=PASSIVE).
    """
    times = {name: [] for name in functions}
    cpu = {name: [] for name in functions}
    results = {}
    for _ in range(repeat):
        for name, fn in functions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: (statistics.median(times[name]), results[name], statistics.median(cpu[name])) for name in functions}


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
    """A small GAP classifier for the smoke run; stride 2, so Score-CAM's two mask settings differ."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
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


@contextlib.contextmanager
def _peer_masks(align_corners: bool):
    """pytorch-grad-cam's ScoreCAM upsamples with ``nn.UpsamplingBilinear2d`` (corners aligned); for the
    other setting its upsampler is swapped for the run, so both sides build the same masks."""
    original = nn.UpsamplingBilinear2d
    if not align_corners:
        nn.UpsamplingBilinear2d = lambda size: nn.Upsample(size=size, mode="bilinear", align_corners=False)
    try:
        yield
    finally:
        nn.UpsamplingBilinear2d = original


def _distinct_masked_inputs(net, layer_name, x) -> torch.Tensor:
    """The masked images convlens scores: one per distinct min-max-normalised channel of the layer."""
    with torch.inference_mode(), cl.capture(net, [layer_name]) as rec:
        rec.forward(x)
    acts = rec.outputs[layer_name][0].float()
    masks = torch.unique(normalise(acts)[0].flatten(1), dim=0).view(-1, 1, *acts.shape[-2:])
    up = nn.functional.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x * normalise(up)[0]


def _passes(net, inputs: torch.Tensor, count: int, batch_size: int, *, channels_last: bool, grad_off):
    """``count`` bare forward passes of ``net``, ``batch_size`` at a time.

    One batch of ``inputs`` is run again and again (dense float kernels take as long whatever the
    values), so the floor costs no memory for masked images.
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    batch = inputs[torch.arange(min(batch_size, count)) % len(inputs)].contiguous(memory_format=layout)
    full, rest = divmod(count, batch_size)

    def run():
        with grad_off():
            for _ in range(full):
                net(batch)
            if rest:
                net(batch[:rest])
    return run


def _matmul_peak() -> float:
    """This CPU's float32 matmul throughput in FLOP/s, best of a few 2048^2 products: a ceiling for convolutions."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = min(_timed(lambda: a @ b, 1)[0] for _ in range(8))
    return 2 * 2048 ** 3 / best


def bench_scorecam(net, layer_name, x, repeat, top_k):
    from pytorch_grad_cam import ScoreCAM

    layer = dict(net.named_modules())[layer_name]
    peer = ScoreCAM(net, [layer])
    # The peer's maps at the layer's resolution, so both are compared before any resize.
    size = tuple(cl.explain(net, x, method="gradcam", layer=layer_name).raw.shape[-2:])
    peer.get_target_width_height = lambda tensor: size[::-1]
    peer_batch = getattr(peer, "batch_size", 16)  # its default when none is set
    ours_batch = scorecam_batch_size(x)
    masked = _distinct_masked_inputs(net, layer_name, x)
    distinct = masked.shape[0]
    with torch.inference_mode(), cl.capture(net, [layer_name]) as rec:
        rec.forward(x)
    channels = rec.outputs[layer_name].shape[1]

    def peer_run(align_corners):
        with _peer_masks(align_corners), contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
            return peer(x, targets=None)

    try:
        results = _interleaved({
            "convlens aligned": lambda: cl.explain(net, x, method="scorecam", layer=layer_name, align_corners=True),
            "peer aligned": lambda: peer_run(True),
            "convlens": lambda: cl.explain(net, x, method="scorecam", layer=layer_name),
            "peer": lambda: peer_run(False),
            "floor": _passes(net, masked, distinct, ours_batch, channels_last=True, grad_off=torch.inference_mode),
            "peer floor": _passes(net, masked, channels, peer_batch, channels_last=False, grad_off=torch.no_grad),
        }, repeat)
        approx_time, approx = _timed(
            lambda: cl.explain(net, x, method="scorecam", layer=layer_name, align_corners=True, top_k=top_k), repeat)
    finally:
        peer.activations_and_grads.release()
    diffs = {}
    for ours, theirs in (("convlens aligned", "peer aligned"), ("convlens", "peer")):
        diffs[ours] = float((_minmax(results[ours][1].raw) - torch.as_tensor(results[theirs][1])).abs().max())
    diff_approx = float((_minmax(results["convlens aligned"][1].raw) - _minmax(approx.raw)).abs().max())
    with FlopCounterMode(display=False) as flops, torch.inference_mode():
        net(x)
    info = {"distinct": distinct, "channels": channels, "batch": ours_batch, "peer batch": peer_batch,
            "flops": flops.get_total_flops(), "peak": _matmul_peak()}
    return results, (approx_time, diff_approx), diffs, info


def _print_scorecam(score, approx, diffs, info, top_k):
    t = {name: value[0] for name, value in score.items()}
    cpu = {name: value[2] for name, value in score.items()}
    print(f"  convlens: {info['distinct']} distinct masks of {info['channels']} channels, batch {info['batch']} "
          f"(rule: {CPU_BATCH_PIXELS:,} masked pixels per pass on CPU); pytorch-grad-cam: batch {info['peer batch']}")
    for label, ours, theirs in (("pytorch-grad-cam's masks, align_corners=True", "convlens aligned", "peer aligned"),
                                ("convlens' default masks, align_corners=False", "convlens", "peer")):
        print(f"  {label}:")
        print(f"    {'pytorch-grad-cam ScoreCAM':40s} {t[theirs] * 1000:9.1f} ms")
        print(f"    {'convlens scorecam (exact)':40s} {t[ours] * 1000:9.1f} ms   {t[theirs] / t[ours]:5.2f}x faster "
              f"(target >= 2; {cpu[theirs] / cpu[ours]:.2f}x in CPU time); max |map diff| {diffs[ours]:.2e}")
    print(f"  {'forward passes alone, as convlens runs them':42s} {t['floor'] * 1000:9.1f} ms   "
          f"({info['distinct']} x channels-last, batch {info['batch']}); convlens aligned is "
          f"{t['convlens aligned'] / t['floor']:5.2f}x this floor")
    print(f"  {'forward passes alone, as the peer runs them':42s} {t['peer floor'] * 1000:9.1f} ms   "
          f"({info['channels']} x channels-first, batch {info['peer batch']})")
    print(f"  floor ratio (peer's passes / convlens' passes): {t['peer floor'] / t['floor']:5.2f}x "
          f"({cpu['peer floor'] / cpu['floor']:.2f}x in CPU time); "
          f"peer's ScoreCAM / convlens' passes: {t['peer aligned'] / t['floor']:5.2f}x "
          "(the most exact Score-CAM with these passes can gain)")
    bound = info["distinct"] * info["flops"] / info["peak"]
    print(f"  hardware bound: {info['distinct']} passes x {info['flops'] / 1e9:.3g} GFLOP at this CPU's float32 "
          f"matmul peak ({info['peak'] / 1e9:.0f} GFLOP/s) >= {bound * 1000:.1f} ms, so at most "
          f"{t['peer aligned'] / bound:5.2f}x faster than pytorch-grad-cam; convlens' passes run at "
          f"{bound / t['floor'] * 100:.0f}% of that peak")
    approx_time, approx_error = approx
    print(f"  {f'convlens scorecam top_k={top_k} (approximate)':42s} {approx_time * 1000:9.1f} ms   "
          f"{t['peer aligned'] / approx_time:5.2f}x faster; max |map diff| vs exact {approx_error:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, for the smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=None, help="runs per measurement (default 5, Score-CAM 1)")
    parser.add_argument("--top-k", type=int, default=None, help="channels kept by the approximate Score-CAM")
    parser.add_argument("--only", choices=["gradcam", "scorecam"], default=None, help="run one of the two parts")
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

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; load average "
          f"{os.getloadavg()[0]:.2f} before (a quiet machine reads below 0.5)")
    if args.only != "scorecam":
        grad = bench_gradcam(gradcam_net, gradcam_layer, gradcam_x, repeat_g)
        base, ours, planned, peer = (grad[k][0] for k in ("baseline", "convlens", "convlens on a plan",
                                                          "pytorch-grad-cam"))
        print(f"\nGrad-CAM  {'quick net' if args.quick else 'resnet50'}, batch {gradcam_x.shape[0]}, "
              f"{gradcam_x.shape[-1]}x{gradcam_x.shape[-2]}, {gradcam_layer} (median of {repeat_g})")
        print(f"  {'forward + backward to layer (baseline)':42s} {base * 1000:9.1f} ms")
        print(f"  {'convlens gradcam, on a plan (method only)':42s} {planned * 1000:9.1f} ms   {planned / base:5.2f}x "
              "baseline (target <= 1.15)")
        print(f"  {'convlens explain, one-off call':42s} {ours * 1000:9.1f} ms   {ours / base:5.2f}x baseline")
        print(f"  {'pytorch-grad-cam GradCAM':42s} {peer * 1000:9.1f} ms   convlens is {peer / ours:5.2f}x faster "
              f"(target >= 2)")
    if args.only != "gradcam":
        print(f"\nScore-CAM  {'quick net' if args.quick else 'resnet18'}, {score_layer}, one image "
              f"{score_x.shape[-1]}x{score_x.shape[-2]} (median of {repeat_s}, interleaved)")
        _print_scorecam(*bench_scorecam(score_net, score_layer, score_x, repeat_s, top_k), top_k)
    print(f"\nload average {os.getloadavg()[0]:.2f} after (this run's own threads count up to {args.threads})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
