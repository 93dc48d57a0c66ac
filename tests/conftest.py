"""Shared fixtures: a tiny corpus in the training layout and a tiny model trained on it."""
import lzma
import sys

import pytest

from bfn_codec.model import ModelConfig, save_weights
from bfn_codec.train import TrainConfig, Trainer

TINY = ModelConfig(d_model=64, n_layers=2, n_heads=4, chunk_len=16, context_len=32, beta1=3.0, rope=True)
TINY_SAR = ModelConfig(arch="sar", output="bytes", d_model=64, n_layers=2, n_heads=4, chunk_len=2, context_len=64,
                       step_d_model=32, step_layers=1, step_heads=2, beta1=3.0)
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


@pytest.fixture(scope="session")
def tiny_sar(tmp_path_factory, corpus):
    """Weights of a tiny semi-autoregressive model (joint byte output, chunks of 1 and 2
    bytes) trained on TEXT with the discrete-time loss."""
    out = tmp_path_factory.mktemp("sar")
    trainer = Trainer(out, TINY_SAR, tiny_train_config(corpus, batch_size=8, max_steps=250, loss="discrete",
                                                       chunk_lens="1,2", aux_ce=1.0))
    trainer.run()
    path = out / "tiny_sar.pt"
    save_weights(path, trainer.ema)
    return path


@pytest.fixture(scope="session")
def tiny_sar_local(tmp_path_factory, tiny_sar):
    """tiny_sar with its first context layer attending to the last 8 tokens only."""
    import dataclasses
    from bfn_codec.model import load_weights
    model = load_weights(tiny_sar)[0]
    model.cfg = dataclasses.replace(model.cfg, local_layers=1, local_window=8)
    path = tmp_path_factory.mktemp("sar_local") / "tiny_sar_local.pt"
    save_weights(path, model)
    return path


@pytest.fixture(scope="session")
def tiny_sar_one(tmp_path_factory, tiny_sar):
    """tiny_sar coding one-byte chunks: from format 7 its per-step network runs in the kernel."""
    import dataclasses
    from bfn_codec.model import load_weights
    model = load_weights(tiny_sar)[0]
    model.cfg = dataclasses.replace(model.cfg, coding_chunk_len=1)
    path = tmp_path_factory.mktemp("sar_one") / "tiny_sar_one.pt"
    save_weights(path, model)
    return path


@pytest.fixture(params=["tiny_model", "tiny_sar"])
def any_model(request):
    """Each tiny model in turn: the chunk design with bit outputs, the sar design with byte outputs."""
    return request.getfixturevalue(request.param)


def cli(*args):
    """argv for running a training command (train_cli) in a fresh interpreter."""
    return [sys.executable, "-c", "import sys; from bfn_codec.train_cli import %s as m; sys.exit(m())" % args[0], *args[1:]]
