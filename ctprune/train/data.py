"""Training and evaluation data: `.npz` files, image folders, or synthetic inputs.

A `.npz` holds `x` (float32, exactly the model's input layout, already preprocessed) and optionally `y` (integer class
labels). A folder holds one sub-folder per class (sorted names → labels 0..K-1) of images that Pillow can read; they are
resized to `input_size`, scaled to [0, 1], normalised by `mean`/`std` and laid out as the model's input (NCHW or NHWC).
Every problem is a `DataError` that names the file and says what was expected.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Sequence

import numpy as np

from ctprune.errors import DataError

__all__ = ["Dataset", "load_data", "synthetic_data", "check_input_size", "check_finite", "require_fixed_input", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclasses.dataclass
class Dataset:
    """Inputs `x` (float32, model layout), optional labels `y` (int64), and where they came from."""

    x: np.ndarray
    y: np.ndarray | None = None
    source: str = ""
    synthetic: bool = False

    def __len__(self) -> int:
        return len(self.x)

    @property
    def has_labels(self) -> bool:
        return self.y is not None


def _dims(input_shape: Sequence) -> list[int | None]:
    """Model input shape with symbolic / unknown dims as None."""
    return [d if isinstance(d, int) and d > 0 else None for d in input_shape]


def _fits(sample_shape: tuple, input_shape: Sequence) -> bool:
    dims = _dims(input_shape)[1:]
    return len(sample_shape) == len(dims) and all(d is None or d == s for d, s in zip(dims, sample_shape))


def _shape_text(input_shape: Sequence) -> str:
    return "(" + ", ".join(str(d) if d is not None else "?" for d in _dims(input_shape)) + ")"


def _check_labels(y: np.ndarray, num_classes: int | None, source: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels 'y' have dtype {y.dtype}; expected integer class ids (int64).")
    if y.ndim != 1:
        raise DataError(f"{source}: labels 'y' have shape {y.shape}; expected one class id per sample (N,).")
    if len(y) and num_classes is not None:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{source}: labels range from {lo} to {hi}, but the model has {num_classes} classes "
                f"(labels must lie in 0..{num_classes - 1})."
            )
    return y.astype(np.int64, copy=False)


def _member(archive, name: str, path: pathlib.Path) -> np.ndarray:
    """One array of the archive; object arrays (which only unpickling could read) and damaged members are errors."""
    try:
        value = archive[name]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path}: {name!r} holds Python objects (dtype object); ctprune reads only numeric "
                            f"arrays and never unpickles data: save {name!r} as a float32 / int64 array.") from None
        raise DataError(f"{path}: {name!r} cannot be read ({exc}).") from None
    except Exception as exc:  # zipfile/zlib/OSError for a damaged or truncated member
        raise DataError(f"{path}: {name!r} cannot be read ({type(exc).__name__}: {exc}); the .npz is damaged.") from None
    if not isinstance(value, np.ndarray):  # numpy hands back a member without the .npy header as raw bytes
        raise DataError(f"{path}: {name!r} cannot be read (it is not a .npy array); save the data with np.savez.")
    return value


def check_finite(x: np.ndarray, source: str) -> None:
    """NaN or Inf in the inputs would surface much later as 'training diverged': name it here instead."""
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) if len(x) else np.zeros(0, bool)
    if bad.any():
        first = int(np.argmax(bad))
        raise DataError(f"{source}: {int(bad.sum())} of {len(x)} samples hold NaN or Inf values (the first is "
                        f"sample {first}); ctprune needs finite inputs.")


def _load_npz(path: pathlib.Path, input_shape: Sequence, num_classes: int | None) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a corrupt archive
        raise DataError(f"{path}: cannot read as .npz ({exc}).") from exc
    if not hasattr(archive, "files"):  # a bare .npy: one array, not an archive of x and y
        raise DataError(f"{path}: is a single array, not a .npz archive; save it with np.savez(path, x=..., y=...).")
    with archive:
        if "x" not in archive.files:
            raise DataError(f"{path}: no array named 'x' (found: {', '.join(archive.files) or 'nothing'}); "
                            "a data .npz holds 'x' (inputs) and optionally 'y' (labels).")
        x = _member(archive, "x", path)
        y = _member(archive, "y", path) if "y" in archive.files else None
    if x.dtype != np.float32:
        raise DataError(f"{path}: 'x' has dtype {x.dtype}; expected float32 inputs, already preprocessed "
                        "exactly as the model expects.")
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{path}: 'x' holds no samples (shape {x.shape}); it needs N samples first, then the "
                        f"model input's own dims {_shape_text(input_shape)}.")
    if not _fits(x.shape[1:], input_shape):
        raise DataError(f"{path}: 'x' has shape {x.shape}, which does not fit the model's input "
                        f"{_shape_text(input_shape)} (N samples first, then the input's own dims).")
    check_finite(x, f"{path}: 'x'")
    if y is not None:
        y = _check_labels(y, num_classes, str(path))
        if len(y) != len(x):
            raise DataError(f"{path}: 'x' holds {len(x)} samples but 'y' holds {len(y)} labels.")
    return Dataset(x=x, y=y, source=str(path))


def _layout(input_shape: Sequence) -> tuple[str, int]:
    """('NCHW' | 'NHWC', channels) of a 4-D image input."""
    dims = _dims(input_shape)
    if len(dims) != 4:
        raise DataError(f"image folders need a 4-D model input; this model's input is {_shape_text(input_shape)}.")
    if dims[1] in (1, 3):
        return "NCHW", dims[1]
    if dims[3] in (1, 3):
        return "NHWC", dims[3]
    raise DataError(f"cannot tell the channel axis of the model input {_shape_text(input_shape)}: "
                    "image folders need 1 or 3 channels first (NCHW) or last (NHWC).")


def _per_channel(values, channels: int, name: str) -> np.ndarray:
    arr = np.asarray(values if values is not None else [0.0 if name == "mean" else 1.0], dtype=np.float32).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise DataError(f"--{name} has {arr.size} values; the model input has {channels} channels.")
    if name == "std" and np.any(arr <= 0):
        raise DataError(f"--std must be positive; got {arr.tolist()}.")
    return arr


def _load_folder(root: pathlib.Path, input_shape, num_classes, input_size, mean, std) -> Dataset:
    from PIL import Image

    layout, channels = _layout(input_shape)
    dims = _dims(input_shape)
    hw = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    if input_size is not None:
        size = check_input_size(input_size, input_shape)
    elif None in hw:
        raise DataError(f"{root}: the model's input {_shape_text(input_shape)} has no fixed image size; "
                        "give --input-size H,W.")
    else:
        size = hw
    mean_c, std_c = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class sub-folders; an image folder holds one sub-folder of images per class.")
    if num_classes is not None and len(classes) > num_classes:
        raise DataError(f"{root}: {len(classes)} class folders, but the model has {num_classes} classes "
                        f"(labels 0..{len(classes) - 1} would not fit 0..{num_classes - 1}).")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.BILINEAR)
                    pixels = np.asarray(img, dtype=np.float32) / 255.0
            except Exception as exc:
                raise DataError(f"{path}: cannot read the image ({exc}).") from exc
            pixels = pixels.reshape(size[0], size[1], channels)
            xs.append((pixels - mean_c) / std_c)
            ys.append(label)
    if not xs:
        raise DataError(f"{root}: the class folders hold no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    x = np.stack(xs).astype(np.float32)
    if layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    log.info("%s: %d images in %d classes, %s %s", root, len(x), len(classes), layout, x.shape[1:])
    return Dataset(x=x, y=np.asarray(ys, dtype=np.int64), source=str(root))


def check_input_size(input_size, input_shape: Sequence) -> tuple[int, int] | None:
    """--input-size: two positive integers H,W that agree with the model input's fixed image size, if it has one."""
    if input_size is None:
        return None
    text = ",".join(str(v) for v in input_size)
    try:
        size = tuple(int(v) for v in input_size)
    except (TypeError, ValueError):
        raise DataError(f"--input-size {text!r} is not two integers H,W (e.g. 224,224).") from None
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"--input-size {text} is not two positive integers H,W (e.g. 224,224).")
    dims = _dims(input_shape)
    if len(dims) != 4:
        raise DataError(f"--input-size {text}: the model's input {_shape_text(input_shape)} is not an image batch.")
    hw = (dims[2], dims[3]) if dims[1] in (1, 3) or dims[3] not in (1, 3) else (dims[1], dims[2])
    if any(d is not None and d != s for d, s in zip(hw, size)):
        raise DataError(f"--input-size {text} does not fit the model's input {_shape_text(input_shape)}, "
                        f"whose image size is fixed at {hw[0]},{hw[1]}.")
    return size


def load_data(spec, input_shape: Sequence, num_classes: int | None = None, input_size=None, mean=None,
              std=None) -> Dataset:
    """Load `spec` (a .npz path or an image folder) for a model whose input is `input_shape` (batch dim first).

    `num_classes` bounds the labels; `input_size` (H, W), `mean`, `std` (per channel or one value) preprocess images.
    """
    if isinstance(spec, Dataset):
        return spec
    path = pathlib.Path(spec)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (data is a .npz file or a folder of class sub-folders).")
    if path.is_dir():
        return _load_folder(path, input_shape, num_classes, input_size, mean, std)
    if not path.is_file():  # a FIFO would block np.load forever: refuse it from its stat
        raise DataError(f"{path}: is not a regular file (a FIFO, device or socket); data is a .npz file or a folder.")
    size = check_input_size(input_size, input_shape)
    data = _load_npz(path, input_shape, num_classes)
    if size is not None and data.x.ndim == 4 and size not in (tuple(data.x.shape[2:]), tuple(data.x.shape[1:3])):
        raise DataError(f"--input-size {size[0]},{size[1]} does not match {path}, whose 'x' has shape {data.x.shape} "
                        "(--input-size resizes images from folders; a .npz is used as it is).")
    return data


def require_fixed_input(input_shape: Sequence) -> None:
    """Before any training: the rewrite and the latency measurement need every input dim but the batch fixed."""
    if None in _dims(input_shape)[1:]:
        raise DataError(f"the model's input {_shape_text(input_shape)} has free dimensions besides the batch; "
                        "ctprune rewrites and times the model at a fixed input size: export it with a fixed size "
                        "(e.g. onnx.tools.update_model_dims.update_inputs_outputs_dims), then prune that.")


def synthetic_data(input_shape: Sequence, n: int, seed: int = 0) -> Dataset:
    """`n` standard-normal inputs shaped like the model's input, without labels (training then only distils)."""
    dims = _dims(input_shape)[1:]
    if None in dims:
        raise DataError(f"synthetic data needs a fixed input shape; the model's input is {_shape_text(input_shape)}. "
                        "Give --data.")
    x = np.random.default_rng(seed).standard_normal((n, *dims), dtype=np.float32)
    return Dataset(x=x, y=None, source=f"synthetic N(0,1) x{n}", synthetic=True)
