"""Network Dissection of the bundled shapes model against the same architecture with random weights.

Bau et al. (2017) check that the detectors they find come from training: a
network of the same architecture with random weights, dissected the same way,
has far fewer unique detectors. Here: ``convlens.load_model("shapes")`` and a
``ShapesNet`` with seeded random weights (same architecture, same
preprocessing), dissected on ``--images`` generated shapes images with a seed
other than the training seed (0), so the images are unseen. The concepts are
the eight shape classes (each image's object mask is the concept of its class).

    python benchmarks/dissect_shapes.py                   # 2,000 images, layers relu2-relu4
    python benchmarks/dissect_shapes.py --quick           # seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import convlens as cl
from convlens.atlas.dissect import dissect
from convlens.models.loading import resized


def random_twin(model: cl.Model, seed: int) -> cl.Model:
    """The same architecture and preprocessing with seeded random weights."""
    torch.manual_seed(seed)
    arch = model.info["arch"]
    module = cl.models.ARCHITECTURES[arch](**model.info.get("arch_kwargs", {}))
    twin = cl.Model(module, f"{model.name} (random weights)", model.transform, model.input_size, model.labels,
                    output=model.output, info=dict(model.info))
    return resized(twin, model.input_size)


def describe(result, layer: str) -> str:
    counts: dict[str, int] = {}
    for _, label, _ in result.detectors(layer):
        counts[label] = counts.get(label, 0) + 1
    labels = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"{len(result.detectors(layer)):4d} detectors, {result.unique_detectors[layer]} unique"
            + (f" ({labels})" if labels else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1, help="shapes seed (the model was trained on seed 0)")
    parser.add_argument("--layers", default="features.relu2,features.relu3,features.relu4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny run for the test suite")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.layers = 48, "features.relu4"
    torch.set_num_threads(args.threads)
    layers = args.layers.split(",")
    trained = cl.load_model("shapes")
    models = {"trained": trained, "random": random_twin(trained, seed=0)}
    results = {}
    for name, model in models.items():
        start = time.perf_counter()
        results[name] = dissect(model, shapes=args.images, seed=args.seed, layers=layers, figures=False)
        print(f"{name}: dissected {args.images} images in {time.perf_counter() - start:.1f} s")
    print(f"\nNetwork Dissection, {args.images} unseen shapes images (seed {args.seed}), 8 concepts, IoU > 0.04")
    for layer in layers:
        units = len(results["trained"].thresholds[layer])
        print(f"{layer} ({units} units)")
        for name in models:
            print(f"  {name:8s} {describe(results[name], layer)}")
    total = {name: sum(result.unique_detectors.values()) for name, result in results.items()}
    print(f"unique detectors summed over layers: trained {total['trained']}, random {total['random']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
