"""Shared fixtures: a tiny corpus in the training layout and a tiny model trained on it."""
import lzma
import sys

import pytest

from bfn_codec.model import ModelConfig, save_weights
from bfn_codec.train import TrainConfig, Trainer

TINY = ModelConfig(d_model=64, n_layers=2, n_heads=4, chunk_len=16, context_len=32, beta1=3.0, rope=True)
TEXT = (b"The quick brown fox jumps over the lazy dog. " * 40 + b"Pack my box with five dozen liquor jugs!\n") * 30


def make_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in [("train.txt.xz", TEXT), ("valid.txt.xz", TEXT * 2), ("code.txt.xz", TEXT.upper())]:
        with lzma.open(folder / name, "wb") as f:
            f.write(text)
    return folder


def tiny_train_config(data_dir, **kw):
    base = dict(data_dir=str(data_dir), batch_size=16, lr=3e-3, warmup=20, minutes=5, max_steps=300,
                eval_minutes=100, ckpt_minutes=100, val_bytes=4096, val_offset=0, threads=1, ema=0.9)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpus):
    """(Trainer, weights path): a tiny model trained for a few hundred steps on TEXT."""
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(out, TINY, tiny_train_config(corpus))
    trainer.run()
    path = out / "tiny.pt"
    save_weights(path, trainer.ema)
    return trainer, path


@pytest.fixture(scope="session")
def tiny_model(trained):
    return trained[1]


def cli(*args):
    """argv for running a console script in a fresh interpreter."""
    return [sys.executable, "-c", "import sys; from bfn_codec.cli import %s as m; sys.exit(m())" % args[0], *args[1:]]
