"""Filter patterns: convlens vs torch-lucent 0.1.8 on the same 64 channels, side by side in one run.

    python benchmarks/bench_filters.py               # resnet18 layer2, 64 filters, 128 px, 128 steps, 2 threads
    python benchmarks/bench_filters.py --lucent default   # only lucent's default row (the long one)
    python benchmarks/bench_filters.py --quick       # a tiny model, a few steps, no lucent (the test suite runs this)

Both render the same channels as one batch (image i maximises channel i) from
a seeded, randomly initialised resnet18 (no download). lucent runs with its
defaults (Fourier + decorrelated colour, Adam lr 0.05, its standard transforms,
and, for images under 224 px, its upsampling to 224 px); a second lucent row
pins ``fixed_image_size`` to the same size as ours. The "achieved activation"
of every result is measured the same way afterwards: the mean of channel i on
image i, on the untransformed image, at the optimised size.

Also measured (``--memory``): the activations of every conv layer of vgg16 for one
224x224 image (bytes kept vs the bytes those layers' outputs need, peak RSS
growth), and the time to render the activation grid of a 512-channel layer.
Needs: pip install -r benchmarks/requirements.txt (torch-lucent with --no-deps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

import convlens as cl
from convlens.inside import input_normalizer
from convlens.render.grid import activation_grid


def achieved(model: cl.Model, layer: str, images: torch.Tensor) -> torch.Tensor:
    """Mean of channel i on image i, at the images' own size, without any transform."""
    maps = cl.activations(model, input_normalizer(model)(images), [layer])[layer]
    return maps.mean((2, 3)).diagonal()


def run_convlens(model: cl.Model, layer: str, channels: int, size: int, steps: int):
    start = time.perf_counter()
    patterns = cl.filter_patterns(model, layer, filters=range(channels), size=size, steps=steps, seed=0)
    return time.perf_counter() - start, patterns.images


def run_lucent(module: nn.Module, layer: str, channels: int, size: int, steps: int, fixed: bool):
    from lucent.optvis import objectives, param, render

    torch.manual_seed(0)
    np.random.seed(0)
    module.eval()  # as lucent's README does; lucent leaves requires_grad on the weights
    objective = sum(objectives.channel(layer.replace(".", "_"), i, batch=i) for i in range(channels))
    start = time.perf_counter()
    result = render.render_vis(module, objective, lambda: param.image(size, batch=channels), thresholds=(steps,),
                               show_image=False, progress=False, fixed_image_size=size if fixed else None)
    elapsed = time.perf_counter() - start
    return elapsed, torch.from_numpy(result[-1]).permute(0, 3, 1, 2).float()


def filters_benchmark(args) -> None:
    torch.manual_seed(0)
    if args.quick:
        module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(8, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        model, layer = cl.load_model(module), "2"
    else:
        model = cl.load_model(args.model, weights="none")
        module, layer = model.module, args.layer
    print(f"filter patterns: {args.model if not args.quick else 'tiny'} {layer}, {args.filters} filters, "
          f"{args.size} px, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'method':40s} {'seconds':>9s} {'x slower than convlens':>23s} {'mean activation':>16s}", flush=True)
    ours_time, ours_images = run_convlens(model, layer, args.filters, args.size, args.steps)
    _row("convlens", ours_time, ours_time, achieved(model, layer, ours_images))
    if not args.quick:
        for fixed in {"default": (False,), "fixed": (True,), "both": (False, True)}[args.lucent]:
            name = f"lucent ({'fixed ' + str(args.size) if fixed else 'default: upsampled to 224'} px)"
            lucent_time, lucent_images = run_lucent(module, layer, args.filters, args.size, args.steps, fixed)
            _row(name, lucent_time, ours_time, achieved(model, layer, lucent_images))


def _row(name: str, seconds: float, ours: float, activation: torch.Tensor) -> None:
    print(f"{name:40s} {seconds:9.2f} {seconds / ours:23.2f} {activation.mean().item():16.4f}", flush=True)


def _memory(field: str) -> int | None:
    """Linux: current (VmRSS) or peak (VmHWM) resident memory of this process, in bytes."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass


def memory_benchmark(args) -> None:
    model = cl.load_model("vgg16", weights="none")
    image = cl.sample_image("chelsea")
    conv_layers = [name for name, module in model.named_layers().items() if isinstance(module, nn.Conv2d)]
    summary = cl.summarize(model)
    shapes = {row.name: row.output_shape for row in summary.rows}
    needed = sum(4 * int(np.prod(shapes[name][1:])) for name in conv_layers)
    cl.activations(model, image, ["features.0"])  # warm up allocator and kernels
    before = _memory("VmRSS")
    _reset_peak()
    maps = cl.activations(model, image, conv_layers)
    peak, after = _memory("VmHWM"), _memory("VmRSS")
    kept = sum(t.numel() * t.element_size() for t in maps.values())
    print(f"vgg16 activations of all {len(conv_layers)} conv layers, one 224x224 image:")
    print(f"  kept {kept / 2**20:.1f} MiB; those layers' outputs need {needed / 2**20:.1f} MiB "
          f"(ratio {kept / needed:.3f})")
    if before is not None:
        print(f"  resident memory: +{(after - before) / 2**20:.1f} MiB held after the call, "
              f"+{(peak - before) / 2**20:.1f} MiB at the peak during it")
    wide = maps["features.28"][0]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        activation_grid(wide, "features.28")
        times.append(time.perf_counter() - start)
    print(f"  activation grid of features.28 ({wide.shape[0]} channels {wide.shape[1]}x{wide.shape[2]}): "
          f"median {statistics.median(times) * 1000:.0f} ms over 5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, no lucent (smoke test)")
    parser.add_argument("--memory", action="store_true", help="also run the vgg16 memory and grid-time measures")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layer", default="layer2")
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lucent", choices=["both", "default", "fixed"], default="both",
                        help="which lucent rows: its defaults, fixed_image_size=--size, or both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.filters, args.size, args.steps = 4, 16, 3
    if args.memory:  # first, while the process is fresh: resident-memory growth means nothing after big runs
        memory_benchmark(args)
    filters_benchmark(args)


if __name__ == "__main__":
    main()
