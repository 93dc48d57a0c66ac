"""Regenerate the format-compatibility fixture (only when the format changes on purpose):
a small fixed model and a .bfn file made with it. `python tests/data/make_compat.py`"""
from pathlib import Path

import torch

from bfn_codec import codec
from bfn_codec.model import BFNNet, ModelConfig, save_weights

HERE = Path(__file__).parent
CONFIG = ModelConfig(d_model=16, n_layers=1, n_heads=2, chunk_len=16, context_len=16, beta1=3.0, rope=True)
SAMPLE = ("Frames, chunks, steps: a stored stream must decode the same forever. "
          "Ünïcödé, tabs\t and bytes \x00\x01\xff too.\n").encode("utf-8", "surrogateescape") * 6


def main():
    torch.manual_seed(0)
    net = BFNNet(CONFIG)
    with torch.no_grad():
        net.head.weight.normal_(0.0, 0.5)      # a network whose output matters
    save_weights(HERE / "compat_model.pt", net)
    (HERE / "compat_sample.bin").write_bytes(SAMPLE)
    blob, _ = codec.compress(SAMPLE, HERE / "compat_model.pt", fallback=False)
    (HERE / "compat_sample.bin.bfn").write_bytes(blob)


if __name__ == "__main__":
    main()
