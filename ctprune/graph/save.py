"""Where outputs go: checks before any work (no output is an input or another output; the folder exists and can be
written; the target is a regular file), then atomic writes (a temporary file beside the target, given the umask's
mode, then a rename), so a failed or killed run leaves no partial file and never touches an input."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile

import onnx

from ctprune.errors import CtpruneError

# Above this, weights go to a side file (protobuf's 2 GB limit); ctprune's outputs are normally far smaller.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def default_output_path(model_path: str | os.PathLike) -> pathlib.Path:
    """MODEL.onnx -> MODEL.ctprune.onnx beside it."""
    path = pathlib.Path(model_path)
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + ".ctprune.onnx")


def check_output_path(output: str | os.PathLike, model_path: str | os.PathLike | None) -> pathlib.Path:
    """Refuse to overwrite the input, a folder, a device or FIFO, and to write into a folder that does not exist or
    cannot be written — before any work is done."""
    out = pathlib.Path(output)
    if model_path is not None and isinstance(model_path, (str, os.PathLike)) and _same_file(out, model_path):
        raise CtpruneError(f"the output {str(out)!r} is the input model; ctprune never overwrites its input.")
    folder = out.parent if str(out.parent) not in ("", ".") else pathlib.Path(".")
    if not folder.exists():
        raise CtpruneError(f"cannot write {str(out)!r}: the folder {str(out.parent)!r} does not exist.")
    if out.is_dir():
        raise CtpruneError(f"cannot write {str(out)!r}: it is a folder.")
    if out.exists() and not out.is_file():
        raise CtpruneError(f"cannot write {str(out)!r}: it is not a regular file (a device, FIFO or socket).")
    check_writable_folder(folder, f"cannot write {str(out)!r}")
    return out


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Create and remove a temporary file in `folder` (os.access says yes to root on a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ctprune-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CtpruneError(f"{what}: the folder {str(folder)!r} is not writable ({exc.strerror or exc}).") from None


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Same file by inode when both exist (hard links, symlinks), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def external_data_files(model_path: str | os.PathLike) -> list[pathlib.Path]:
    """The files a model's external-data tensors name (resolved beside the model), without reading any weights."""
    from ctprune.graph.filebacked import load_file_backed

    try:  # the weights stay in the file: only the graph is parsed
        model = load_file_backed(model_path)
    except Exception:  # not ONNX at all: loading the model says so, with its own message
        return []
    folder = pathlib.Path(model_path).parent
    found = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location == pathlib.Path(model_path).name:  # the model's own inline weights, referenced in place
                continue
            if location and folder / location not in found:
                found.append(folder / location)
    return found


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_tensors(g)


def check_distinct_paths(inputs: dict, outputs: dict, checkpoint_dir: str | os.PathLike | None = None) -> None:
    """Before any work: no output (label -> path) is an input (label -> path) or another output, by path, symlink
    or hard link, and the checkpoint folder (removed after a successful run) is none of them and holds no input.
    None values are skipped. The first clash is one CtpruneError naming both."""
    inputs = {k: v for k, v in inputs.items() if v is not None}
    outputs = {k: v for k, v in outputs.items() if v is not None}
    for out_label, out in outputs.items():
        for in_label, src in inputs.items():
            if _same_file(out, src):
                raise CtpruneError(f"{out_label} {str(out)!r} is {in_label}; ctprune never overwrites its inputs: "
                                   "choose another path.")
    labels = list(outputs)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if _same_file(outputs[a], outputs[b]):
                raise CtpruneError(f"{a} and {b} are the same file {str(outputs[a])!r}: give them different paths.")
    if checkpoint_dir is None:
        return
    for label, path in {**inputs, **outputs}.items():
        inside = label in inputs and os.path.exists(checkpoint_dir) and _inside(path, checkpoint_dir)
        if inside or _same_file(path, checkpoint_dir):
            raise CtpruneError(f"{label} {str(path)!r} is in the checkpoint folder {str(checkpoint_dir)!r}, which "
                               "ctprune uses for this run and clears after it: move it, or choose another --output.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic(output: str | os.PathLike):
    """Yield a temporary path beside `output`; on success it replaces `output`, on any failure it is removed."""
    out = pathlib.Path(output)
    fd, tmp = tempfile.mkstemp(prefix="." + out.name + ".", suffix=".tmp", dir=str(out.parent) or ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode a plain open() would
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model_atomic(model: onnx.ModelProto, output: str | os.PathLike) -> pathlib.Path:
    if model.ByteSize() > _EXTERNAL_DATA_THRESHOLD:
        raise CtpruneError(f"the pruned model is over {_EXTERNAL_DATA_THRESHOLD} bytes; external data is not supported yet.")
    with _atomic(output) as tmp:
        onnx.save_model(model, tmp)
    return pathlib.Path(output)


def write_json_atomic(data: str, output: str | os.PathLike) -> pathlib.Path:
    with _atomic(output) as tmp:
        pathlib.Path(tmp).write_text(data)
    return pathlib.Path(output)
