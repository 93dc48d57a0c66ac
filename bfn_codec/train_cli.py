"""Command line: bfn-train, bfn-sample (bfn-compress and bfn-decompress: cli.py). Thin: parse, call, report.

Exit codes: 0 success, 1 error (a one-line message on stderr), 2 a malformed command line.
"""
import dataclasses
import os
import signal
import sys

import click

from .container import MAX_STEPS

from .model import ModelConfig
from .train import TrainConfig


def _options_from(cls, skip=()):
    """click options for every field of a config dataclass (--field-name VALUE)."""
    def wrap(f):
        for field in reversed(dataclasses.fields(cls)):
            if field.name in skip:
                continue
            flag = "--" + field.name.replace("_", "-")
            if field.type in (bool, "bool"):
                f = click.option(flag + "/--no-" + field.name.replace("_", "-"), field.name,
                                 default=None, help=f"default {field.default}")(f)
            else:
                typ = {"int": int, "float": float, "str": str}.get(field.type, field.type)
                f = click.option(flag, field.name, type=typ, default=None, help=f"default {field.default}")(f)
        return f
    return wrap


def _build(cls, values):
    return cls(**{k: v for k, v in values.items() if v is not None and k in {f.name for f in dataclasses.fields(cls)}})


@click.command(context_settings={"show_default": True})
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--export", type=click.Path(dir_okay=False), default=None,
              help="write the run's EMA weights as a weights file (float16) to this path, and exit "
                   "(--coding-chunk-len and --coding-steps set the chunk length and n its files are "
                   "coded with by default; --local-layers and --local-window the context layers that "
                   "attend to the last few tokens only)")
@_options_from(ModelConfig)
@_options_from(TrainConfig)
def train_cmd(out_dir, export, **values):
    """Train a BFN into OUT_DIR, or resume the run there (its checkpoint's config wins)."""
    from .bfn import bits
    from .train import Trainer
    if export:
        from .model import load_weights, save_weights
        import torch
        model, _, _ = load_weights(os.path.join(out_dir, "ckpt.pt"), dtype=torch.float32)
        if values.get("coding_chunk_len"):
            if values["coding_chunk_len"] not in model.chunk_lens:
                raise click.UsageError(f"this model codes chunks of {list(model.chunk_lens)} bytes")
            model.cfg = dataclasses.replace(model.cfg, coding_chunk_len=values["coding_chunk_len"])
        if values.get("coding_steps") is not None:
            if not 1 <= values["coding_steps"] <= MAX_STEPS:
                raise click.UsageError(f"--coding-steps must be 1 to {MAX_STEPS}")
            model.cfg = dataclasses.replace(model.cfg, coding_steps=values["coding_steps"])
        local = {k: values[k] for k in ("local_layers", "local_window") if values.get(k) is not None}
        if local:
            model.cfg = dataclasses.replace(model.cfg, **local)
            if model.cfg.arch != "sar" or not 0 <= model.cfg.local_layers <= model.cfg.n_layers \
                    or model.cfg.local_window < (1 if model.cfg.local_layers else 0):
                raise click.UsageError("--local-layers must be 0 to the context network's layers, "
                                       "with --local-window at least 1")
        tmp = export + ".tmp"
        save_weights(tmp, model)
        os.replace(tmp, export)
        click.echo(f"{export}: model {load_weights(export)[1]}", err=True)
        return
    explicit = {k: v for k, v in values.items() if v is not None}
    trainer = Trainer(out_dir, _build(ModelConfig, values), _build(TrainConfig, values), explicit)
    if trainer.rank == 0:       # under torchrun, rank 0 speaks for all
        click.echo(f"{trainer.net.num_params():,} parameters, step {trainer.step}, {trainer.world} process(es), "
                   f"{trainer.mcfg}, {trainer.tcfg}", err=True)

    def progress(step, loss):
        if step % 10 == 0:
            click.echo(f"\rstep {step}  train {bits(loss):.3f} bits/byte  "
                       f"{trainer.train_seconds / 60:.1f} min", err=True, nl=False)

    def stop(signum, frame):     # first Ctrl-C or TERM: finish the step, evaluate, save, exit
        trainer.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        click.echo("\nstopping after this step (evaluating and saving the checkpoint)", err=True)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    trainer.run(progress if sys.stderr.isatty() and trainer.rank == 0 else None)
    if trainer.world > 1:
        import torch.distributed
        torch.distributed.destroy_process_group()


@click.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--length", default=256, help="bytes to generate")
@click.option("--steps", default=20, help="n: generation steps")
@click.option("--seed", default=0)
@click.option("--prompt", default="", help="text the sample continues")
def sample_cmd(model_path, length, steps, seed, prompt):
    """Print text generated by n-step sampling from a checkpoint or weights file."""
    import torch
    from .model import generate, load_weights
    model, _, _ = load_weights(model_path, dtype=torch.float32)
    out = generate(model, length, steps, torch.Generator().manual_seed(seed), prompt.encode())
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.write(b"\n")
