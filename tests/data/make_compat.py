"""Regenerate a format-compatibility fixture (only when the format changes on purpose): a
small fixed model and a .bfn file made with it.

    python tests/data/make_compat.py chunk     # compat_model.pt, compat_sample.bin(.bfn): format 2
    python tests/data/make_compat.py sar       # compat_sar_model.pt, compat_sar.bin, compat_sar.v<N>.bfn:
                                               # the format the code writes now (N), kept beside older ones
"""
import sys
from pathlib import Path

import torch

from bfn_codec import codec, container
from bfn_codec.model import ModelConfig, build, save_weights

HERE = Path(__file__).parent
CHUNK = ModelConfig(d_model=16, n_layers=1, n_heads=2, chunk_len=16, context_len=16, beta1=3.0, rope=True)
SAMPLE = ("Frames, chunks, steps: a stored stream must decode the same forever. "
          "Ünïcödé, tabs\t and bytes \x00\x01\xff too.\n").encode("utf-8", "surrogateescape") * 6
SAR = ModelConfig(arch="sar", output="bytes", d_model=16, n_layers=2, n_heads=2, chunk_len=1, context_len=16,
                  step_d_model=8, step_layers=1, step_heads=2, beta1=3.0, coding_steps=2)
SAR_SAMPLE = SAMPLE * 9          # 4.4 KB: several lanes


def random_model(cfg):
    torch.manual_seed(0)
    net = build(cfg)
    with torch.no_grad():
        net.head.weight.normal_(0.0, 0.5)      # a network whose output matters
    return net


def main(which):
    if which == "chunk":
        save_weights(HERE / "compat_model.pt", random_model(CHUNK))
        (HERE / "compat_sample.bin").write_bytes(SAMPLE)
        blob, _ = codec.compress(SAMPLE, HERE / "compat_model.pt", fallback=False)
        (HERE / "compat_sample.bin.bfn").write_bytes(blob)
    else:
        model = HERE / "compat_sar_model.pt"
        if not model.exists():                  # the model stays: older files need it
            save_weights(model, random_model(SAR))
        (HERE / "compat_sar.bin").write_bytes(SAR_SAMPLE)
        blob, _ = codec.compress(SAR_SAMPLE, model, fallback=False)
        (HERE / f"compat_sar.v{container.unpack(blob)[0].version}.bfn").write_bytes(blob)


if __name__ == "__main__":
    main(sys.argv[1])
