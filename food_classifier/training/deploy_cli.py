"""`import-onnx` and `export-mobile`: the Typer commands. Imports only typer at module level;
`food_classifier.cli` registers them. The work is in `import_onnx.py` and `export_mobile.py`."""

from __future__ import annotations

from pathlib import Path

import typer

from food_classifier.defaults import MODELS_DIR


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _floats3(text: str | None, flag: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        fail(f"{flag} needs three comma-separated numbers (R,G,B), got '{text}'")
    return values  # type: ignore[return-value]


def import_onnx_cmd(
        model: Path = typer.Argument(..., help="Any image-classifier ONNX file (Keras 3, tf2onnx, torch, ...)."),
        labels: Path = typer.Option(..., help="Labels file: one class per line, in output order."),
        name: str = typer.Option(..., help="Model name; published as MODELS_DIR/NAME/VERSION."),
        layout: str | None = typer.Option(None, help="NCHW or NHWC (default: detected from the input shape)."),
        resize: int | None = typer.Option(None, help="Shorter side before the crop (default crop/0.875)."),
        crop: int | None = typer.Option(None, help="Centre crop = model input size (default: the model's)."),
        mean: str | None = typer.Option(None, help="M,M,M in the --scale range (default 0,0,0)."),
        std: str | None = typer.Option(None, help="S,S,S in the --scale range (default 1,1,1)."),
        scale: float | None = typer.Option(None, help="Input range before mean/std: 1 = [0,1] (default), 255 = raw."),
        interpolation: str | None = typer.Option(None, help="bicubic (default), bilinear or nearest."),
        outputs: str = typer.Option("logits", help="logits, or probs when the graph ends in a softmax."),
        check_images: Path | None = typer.Option(None, help="Folder of class folders: print accuracy on them."),
        min_accuracy: float = typer.Option(0.0, min=0.0, max=1.0, help="Refuse to publish below this accuracy."),
        models_dir: Path = typer.Option(MODELS_DIR)) -> None:
    """Wrap any ONNX image classifier into a bundle.

    The bundle works with serve, predict and every other command."""
    from food_classifier.bundle import BundleError
    from food_classifier.training.import_onnx import import_onnx, read_labels

    given = {"resize": resize, "crop": crop, "mean": _floats3(mean, "--mean"), "std": _floats3(std, "--std"),
             "scale": scale, "interpolation": interpolation, "layout": layout.upper() if layout else None}
    try:  # caught here: the generic handler imports the training stack just to name its errors
        result = import_onnx(model, read_labels(labels), name, {k: v for k, v in given.items() if v is not None},
                             outputs=outputs, models_dir=models_dir, check_images=check_images,
                             min_accuracy=min_accuracy)
    except BundleError as e:
        fail(str(e))
    if result.accuracy is not None:
        typer.echo(f"accuracy on {check_images}: {result.accuracy:.4f} ({result.n_checked} images"
                   + (f", {result.skipped} unreadable skipped)" if result.skipped else ")"))
    if result.bundle is None:
        fail(f"accuracy {result.accuracy:.4f} is below --min-accuracy {min_accuracy}: not published")
    typer.echo(result.bundle)


def export_mobile_cmd(model: Path = typer.Argument(..., help="Bundle dir or model dir (newest version)."),
                      out: Path = typer.Option(Path("mobile"), help="Output folder (created; files replaced)."),
                      check: Path | None = typer.Option(
                          None, help="Photos for the .ort parity check (default: the test tier of the bundle's "
                                     "manifest).")) -> None:
    """Export a bundle for phones (ONNX Runtime Mobile).

    Writes .ort fp32 + int8, required_operators.config, labels, preprocessing.json."""
    from food_classifier.bundle import BundleError
    from food_classifier.training.export_mobile import export_mobile, format_sizes

    try:
        typer.echo(format_sizes(export_mobile(model, out, check_images=check)))
    except BundleError as e:
        fail(str(e))
    typer.echo(f"written to {out}/ (see docs/MOBILE.md for the Android and iOS code)")
