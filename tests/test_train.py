"""Training: it learns, and a resumed run continues exactly."""
import torch

from bfn_codec.train import Trainer

from conftest import TINY, tiny_train_config


def test_tiny_model_learns_repetitive_text(trained):
    trainer, _ = trained
    import json
    log = [json.loads(line) for line in open(trainer.out / "log.jsonl")]
    first, last = log[0], log[-1]
    assert first["val_total10"] > 7.5          # untrained: about 8 bits per byte
    assert last["val_total10"] < 2.0           # far below 8 after a few hundred steps (1.04 seen)
    assert last["val_cont"] < 2.0


def test_resume_continues_identically(tmp_path, corpus):
    straight = Trainer(tmp_path / "a", TINY, tiny_train_config(corpus, max_steps=6))
    straight.run()
    part = Trainer(tmp_path / "b", TINY, tiny_train_config(corpus, max_steps=3))
    part.run()
    resumed = Trainer(tmp_path / "b", TINY, tiny_train_config(corpus, max_steps=6))
    assert resumed.step == 3
    resumed.run()
    for (name, a), (_, b) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
