"""The `ctprune` command line.

    ctprune MODEL.onnx --ratio 8x [options]      prune (the default command: no subcommand word needed)
    ctprune inspect MODEL.onnx                   per-layer table: what would be pruned, unsupported ops
    ctprune bench MODEL.onnx [OTHER.onnx]        latency in onnxruntime

User errors (ctprune.errors.CtpruneError) print one paragraph and exit 2; no traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from ctprune.api import parse_ratio
from ctprune.errors import CtpruneError, Interrupted
from ctprune.options import PruneOptions

class _DefaultPruneGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to `prune`: `ctprune MODEL --ratio 8x`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultPruneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ctprune")
def main():
    """ctprune: prune an ONNX CNN and get back a smaller, faster ONNX model.

    \b
      ctprune model.onnx --ratio 8x                  prune every Conv and FC layer while fine-tuning
      ctprune model.onnx --ratio 4x --method precrop PreCropping: whole channels, standard ONNX ops
      ctprune inspect model.onnx                     what would be pruned
      ctprune bench model.onnx model.ctprune.onnx    latency in onnxruntime

    The output (default MODEL.ctprune.onnx) is the input graph with weights replaced and pruned layers rewritten to
    ai.ctprune.PatternConv (3x3) and ai.ctprune.SparseConv (1x1, kxk, FC); it carries a standard-ONNX definition of
    those ops, so plain onnxruntime runs it, and
    ctprune.InferenceSession (or the library at ctprune.kernel_library_path()) runs it fast.
    """


def _options_from(options_class):
    """click options for every CLI field of PruneOptions (ctprune/options.py): one declaration, three readers."""
    def decorate(command):
        for f in reversed(options_class.cli_fields()):
            meta = dict(f.metadata)
            names = meta["flag_names"] or ("--" + f.name.replace("_", "-"),)
            if meta["flag_names"]:
                names = ("/".join(names),)
            kwargs = {"default": f.default, "help": meta["help"], "show_default": meta["show_default"]}
            if meta["flag"] and not meta["flag_names"]:
                kwargs["is_flag"] = True
            elif meta["choices"]:
                kwargs["type"] = click.Choice(list(meta["choices"]))
            elif meta["type"] is int:
                bounded = meta["min"] is not None or meta["max"] is not None
                kwargs["type"] = click.IntRange(min=meta["min"], max=meta["max"]) if bounded else int
            elif meta["type"] is float:
                kwargs["type"] = click.FloatRange(min=meta["min"], max=meta["max"], min_open=meta["min"] == 0.0)
            command = click.option(*names, f.name, **kwargs)(command)
        return command
    return decorate


@main.command("prune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--ratio", required=True,
              help="Compression of the prunable layers' weights (before / kept): 8x, 8 or 8.0x (must be > 1).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output path [default: MODEL.ctprune.onnx].")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@_options_from(PruneOptions)
def prune_command(model, ratio, output, **options):
    """Prune MODEL.onnx: RATIO times fewer weights in its Conv and FC layers, fine-tuning while pruning."""
    from ctprune import api
    from ctprune.report.render import render_report

    logging.basicConfig(level=logging.WARNING if options.get("quiet") else logging.INFO, format="ctprune: %(message)s")
    ratio_value = parse_ratio(ratio)
    from ctprune.graph.save import default_output_path

    output = output or str(default_output_path(model))
    result = api.prune(model, ratio=ratio_value, output=output, keep_masked_dense=False, **options)
    if not options.get("quiet") and result.report:  # empty on torchrun's other ranks
        click.echo(render_report(result.report))
        click.echo(f"wrote {result.output_path}")


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
def inspect_command(model):
    """Per-layer table of MODEL.onnx: kernels, channels, params, MACs, and what ctprune would prune."""
    from ctprune.graph import load_model
    from ctprune.report.inspect import layer_table, render_table

    rows, totals = layer_table(load_model(model))
    click.echo(render_table(rows, totals))


@main.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(min=3), default=50, show_default=True)
def bench_command(models, threads, batch, repeats):
    """Median latency of each model in onnxruntime (PatternConv through ctprune's kernels), same process and threads."""
    from ctprune.runtime.bench import bench_models, render_bench

    rows = bench_models(list(models), threads=threads, batch=batch, repeats=repeats)
    click.echo(render_bench(rows))


def run(argv=None) -> int:
    """Entry point: user errors become one message and exit code 2, never a traceback."""
    try:
        main.main(args=argv, prog_name="ctprune", standalone_mode=False)
    except CtpruneError as exc:
        click.echo(f"ctprune: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort as exc:  # click's form of Ctrl-C; ctprune.errors.Interrupted says where to resume
        cause = exc.__cause__ or exc.__context__
        click.echo(f"ctprune: {cause}" if isinstance(cause, Interrupted) else "ctprune: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt as exc:  # ctprune.errors.Interrupted says where the checkpoint is
        click.echo(f"ctprune: {exc}" if str(exc) else "ctprune: interrupted", err=True)
        return 130
    except MemoryError:  # the pipeline's own boundary estimates the need; this is the backstop
        click.echo("ctprune: error: out of memory; nothing was written. Free memory or use a larger machine.", err=True)
        return 2
    return 0


def _entry():
    sys.exit(run())
