"""``convlens explain``: heatmaps for images, written as overlays, raw arrays and a comparison figure."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..errors import ConvlensError
from ..fileio import atomic_path, check_output_dir, distinct_stems, save_image, staged_folder, write_text
from . import app
from .common import (BATCH_MAX, CmapAliasOpt, ImagesArg, ModelArg, ModelOptions, comma_list, grouped, named_list,
                     parse_task_target)

if TYPE_CHECKING:
    import numpy as np


#: --targets all draws one panel per class; beyond this many, a figure is no use to anyone.
MAX_CLASS_PANELS = 100


def _parse_target(text: str, count: int):
    """``top1`` -> None; ``all`` -> every class; ``3`` or ``tabby`` -> one target; ``a,b,...`` one per image;
    ``region:``, ``box:`` and ``similar:`` -> the target of a segmenter, a detector, an embedding model."""
    task = parse_task_target(text)
    if task is not None:
        return task
    parts = comma_list(text)
    if len(parts) == 1 and parts[0].lower() == "all":
        return "all"
    if not parts or (len(parts) == 1 and parts[0].lower() in ("top1", "top-1")):
        return None
    values = [int(p) if p.lstrip("-").isdigit() else (None if p.lower() == "top1" else p) for p in parts]
    if len(values) == 1:
        return values[0]
    if len(values) != count:
        raise ConvlensError(f"--targets lists {len(values)} classes for {count} images; give one, or one per image")
    return values


def _slug(method: str) -> str:
    return method.replace("++", "pp")


def _save_array(array: np.ndarray, path: Path) -> None:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


INDEX_COLUMNS = ("file", "input", "method", "target_class", "predicted_class")


def _write_index(rows: list[dict], folder: Path) -> None:
    """``index.csv`` and ``index.json``: which output file came from which input, method and class."""
    import csv
    import io
    import json

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(folder / "index.csv", buffer.getvalue())
    write_text(folder / "index.json", json.dumps(rows, indent=2, ensure_ascii=False) + "\n")


@app.command()
@grouped
def explain(
    model: ModelArg,
    images: ImagesArg,
    method: Annotated[str, typer.Option(
        "--methods", "--method", help="Comma-separated methods, e.g. gradcam,scorecam,saliency.")] = "gradcam",
    layer: Annotated[str, typer.Option(
        "--layers", "--layer", help="'auto' (last spatial layer), a layer name, or several comma-separated.")] = "auto",
    target: Annotated[str, typer.Option(
        "--targets", "--target", help="top1, all (one map per class: CAM and Grad-CAM family), a class index or name, "
                                      "or one per image comma-separated; region:CLASS[:MASK.png] (segmentation), "
                                      "box:INDEX or box:LABEL@x0,y0,x1,y1 (detection, input pixels), "
                                      "similar:REF.png (embeddings).")] = "top1",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs and .npy maps.")] = Path("explanations"),
    colormap: Annotated[Optional[str], typer.Option(
        "--colormap", help="A matplotlib colormap (default: jet over the photo; inferno for pixel-level maps, "
                           "drawn alone).")] = None,
    alpha: Annotated[float, typer.Option(
        "--alpha", help="Heatmap opacity over the photo, 0-1 (pixel-level maps are drawn alone).")] = 0.4,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=BATCH_MAX, help="Images per pass.")] = 8,
    opts: ModelOptions = ModelOptions(),
    cmap: CmapAliasOpt = None,
) -> None:
    """Show where the model looked: one heatmap per image per method (CAM family and gradient saliency).

    Writes, per image, IMAGE_METHOD.png (overlay at the photo's resolution, at most
    2048 px a side), IMAGE_METHOD.npy (the raw map before normalisation) and
    IMAGE_explain.png (the original beside every method). IMAGE is the file's name, with
    the folders that tell same-named inputs apart (circle_00000, cross_00000);
    index.csv and index.json list each file's input, method, target and predicted class.
    Nothing is written if any input is wrong or the disk fills up: the set appears in
    --out complete or not at all.

    Example: convlens explain resnet50 cat.jpg dog.jpg --methods gradcam,scorecam --targets top1 --out maps
    """
    check_output_dir(out)  # before any work: a bad --out must not cost a whole run
    from ..heatmaps import check_request, explain as explain_images, get_method, style_for
    from ..images import load_images
    from ..progress import ProgressDisplay
    from ..render.overlay import (STYLES, bounded, check_style, comparison_figure, describe_style, draw_box,
                                  overlay_heatmap, save_figure)

    colormap = colormap if cmap is None else cmap

    methods = list(dict.fromkeys(get_method(name).name for name in named_list(method, "--methods", "gradcam")))
    check_style(colormap, alpha)
    pictures = load_images(images)
    loaded = opts.open(model)
    layers = comma_list(layer) or ["auto"]
    layer_ref = layers[0] if len(layers) == 1 else layers
    targets = _parse_target(target, len(pictures))
    batches = [range(start, min(start + batch_size, len(pictures))) for start in range(0, len(pictures), batch_size)]

    def batch_targets(indices: range):
        return [targets[i] for i in indices] if isinstance(targets, list) else targets

    # One forward pass per batch settles layers and targets (a bad request fails here, in seconds);
    # every method then runs on that plan, and the predicted classes come from the same pass.
    plans = [check_request(loaded, [pictures[i] for i in indices], methods, layer_ref, batch_targets(indices))
             for indices in batches]
    chosen_layers = plans[0].layers
    every_class = targets == "all"
    if every_class and len(plans[0].class_indices) > MAX_CLASS_PANELS:
        raise ConvlensError(f"--targets all draws one panel per class and this model has {len(plans[0].class_indices)} "
                            f"classes (at most {MAX_CLASS_PANELS}); name the classes instead, e.g. --targets 3")

    # Cheap methods first, so a method-specific error (CAM without a GAP head) comes before the slow ones.
    order = sorted(methods, key=lambda name: get_method(name).kind == "perturbation")
    results: dict[str, list] = {name: [] for name in methods}
    # one colour bar per drawing style, naming the methods drawn in it
    legends = {style: (colormap or STYLES[style], ", ".join(n for n in methods if style_for(n) == style) + ": "
                       + describe_style(style, colormap, alpha))
               for style in dict.fromkeys(style_for(name) for name in methods)}
    with ProgressDisplay("explain", total=len(order) * len(batches), unit="batch") as shown:
        for name in order:
            for number, plan in enumerate(plans, 1):
                shown.begin(name if len(plans) == 1 else f"{name}, batch {number}/{len(plans)}")
                results[name].append(explain_images(loaded, method=name, plan=plan))

    # Everything is computed: only now does anything touch the disk, and only a complete set lands in --out.
    predicted = [label for plan in plans for label in plan.top1()]
    stems = distinct_stems(images)  # circle_00000, cross_00000: named after the part of the paths that differs
    index = []
    try:
        with staged_folder(out) as stage:
            for batch_number, indices in enumerate(batches):
                for offset, image_index in enumerate(indices):
                    stem = stems[image_index]
                    panels = []
                    for name in methods:
                        result = results[name][batch_number]
                        slug = _slug(name)
                        target_class = "all" if every_class else result.target_names[offset]
                        index += [{"file": f"{stem}_{slug}.{ext}", "input": str(images[image_index]), "method": name,
                                   "target_class": target_class, "predicted_class": predicted[image_index]}
                                  for ext in ("png", "npy")]
                        _save_array(result.raw[offset].cpu().numpy(), stage / f"{stem}_{slug}.npy")
                        if every_class:  # one panel per class: the per-class grid
                            thumbnail = bounded(pictures[image_index], 512)  # K panels: small pictures suffice
                            grid = [(f"{label}{' (flat)' if result.flat[offset][k] else ''}",
                                     overlay_heatmap(thumbnail, result.maps[offset, k],
                                                     transform=loaded.transform, colormap=colormap, alpha=alpha,
                                                     style=style_for(name)))
                                    for k, label in enumerate(result.target_names)]
                            figure = comparison_figure(thumbnail, grid, columns=6, title=f"{name}: every class",
                                                       legends=[(legends[style_for(name)][0],
                                                                 describe_style(style_for(name), colormap, alpha))])
                            save_figure(figure, stage / f"{stem}_{slug}.png")
                            continue
                        overlay = overlay_heatmap(pictures[image_index], result.maps[offset],
                                                  transform=loaded.transform, colormap=colormap, alpha=alpha,
                                                  style=style_for(name))
                        if result.boxes is not None:  # a box target: the detection explained, drawn
                            overlay = draw_box(overlay, result.boxes[offset].tolist(),
                                               original_size=pictures[image_index].size,
                                               input_size=tuple(result.maps.shape[-2:]), transform=loaded.transform)
                        save_image(overlay, stage / f"{stem}_{slug}.png")
                        flat = " (flat map)" if result.flat[offset] else ""
                        panels.append((f"{name} — {result.target_names[offset]}{flat}", overlay))
                    if every_class:
                        continue
                    figure = comparison_figure(pictures[image_index], panels, legends=list(legends.values()))
                    figure.axes[0].set_title(f"original — predicted: {predicted[image_index]}", fontsize=9)
                    save_figure(figure, stage / f"{stem}_explain.png")
                    index.append({"file": f"{stem}_explain.png", "input": str(images[image_index]),
                                  "method": ",".join(methods), "target_class": target_class,
                                  "predicted_class": predicted[image_index]})
            _write_index(index, stage)
    except OSError as err:  # a full disk, a folder removed under us: nothing of the set is left behind
        raise ConvlensError(f"cannot write the explanations to {out}: {err.strerror or err}; nothing was written "
                            "(free some space or pass another --out)") from None
    if chosen_layers:
        typer.echo(f"layer: {', '.join(chosen_layers)}{' (auto)' if 'auto' in layers else ''}")
    typer.echo(f"wrote {len(index)} files to {out}, listed in {out / 'index.csv'}")
