"""The network as the coder sees it: one thread, the context network on int8 grids (format 5
on, compiled from 7; float64 before), the per-step network in float64 (compiled from 7 for
one-byte chunks), outputs on a fixed grid, and the coder's family for the file's format
(coder.JointBytes from format 6 on).

The coding path's network side (with coder.Schedule and coder.kl_bits, which import torch
when they run); codec.py imports it when a frame needs the model, so that files the model
cannot win are stored or xz without loading torch at all.
"""
import math

import numpy as np
import torch

from . import coder, container
from .codec import default_chunk_len
from .container import FormatError


class Predictor:
    """`contexts()` follows the lanes of a frame stripe by stripe: its `advance(previous)`
    takes the previous chunk of every lane still going and gives the next stripe's context
    states (the encoder runs it over the whole frame first, the decoder as it goes: the
    same calls in the same order). `for_stripe(states, lengths)` -> predict(s, t), the
    family's quantised output for the stripe's beliefs s (lane after lane) at time t."""

    PROBE_SEQUENCES = 2    # training-length sequences of a frame whose t = 0 code length is measured
    PROBE_RATIO = {True: 0.9, False: 0.5}     # share of it the transmission pays: L = 1, L > 1

    def __init__(self, model, chunk_len=None, version=None):
        torch.set_num_threads(1)           # the same arithmetic in every process
        torch.set_float32_matmul_precision("highest")      # exact.py's float32 products stay float32
        version = version or container.version_for(model.cfg)     # default: the format written now
        self.integer = version in container.INTEGER_CONTEXT        # the context network on int8 grids (exact.py)
        self.compiled = version in container.COMPILED_CONTEXT      # ... in the compiled kernel (context.py)
        self.model = model
        self.cfg = model.cfg
        self.chunk_len = chunk_len or default_chunk_len(model)
        if self.chunk_len not in model.chunk_lens:
            raise FormatError(f"the model codes chunks of {', '.join(map(str, model.chunk_lens))} "
                              f"bytes, not {self.chunk_len}")
        self.family = coder.JointBytes() if version in container.JOINT_BYTES else coder.FAMILIES[model.cfg.output]()
        self.step = None             # the per-step network of one-byte chunks in the kernel (format 7 on)
        if self.compiled and self.cfg.step_layers and self.cfg.output == "bytes":
            from .context import CompiledStep
            self.step = CompiledStep(model)

    def contexts(self):
        return self.model.coding_context(self.integer, self.compiled)

    def for_stripe(self, states, lengths):
        if self.step is not None and all(n == 1 for n in lengths):
            lane_states, prior = self.step.prior(states[:, 0].numpy())
            return lambda s, t: self.family.from_network(torch.from_numpy(
                self.step.log_probs(lane_states, prior, s, t)))
        runs = []                                 # lanes with equal chunk lengths: one network call
        for j, n in enumerate(lengths):
            if runs and runs[-1][2] == n:
                runs[-1][1] += 1
            else:
                runs.append([j, 1, n])
        V = self.cfg.V
        calls = [(self.model.prepare(states[j:j + m]), torch.zeros(m, 1, n, V, 2, dtype=torch.float64))
                 for j, m, n in runs]

        @torch.no_grad()
        def predict(s, t):
            s = np.ascontiguousarray(s, dtype=np.float64)
            outs, offset = [], 0
            for (context, z), (_, m, n) in zip(calls, runs):
                z[..., 1] = torch.from_numpy(s[offset:offset + m * n * V]).reshape(m, 1, n, V)
                t_ = torch.full((1, 1), float(t), dtype=torch.float64)       # every lane's
                outs.append(self.family.from_network(self.model(z, t_, context)))
                offset += m * n * V
            return np.concatenate(outs)
        return predict

    def probe_bits(self, arr):
        """A quick guess of what the BFN would spend on a frame (0 for frames shorter than a
        training sequence): the network's t = 0 code length of PROBE_SEQUENCES sequences spread
        over the frame, in one batched pass the way training sees them, with the model's shortest
        chunk, scaled up and by the share of it that the transmission is taken to pay
        (one-byte chunks pay about their t = 0 prediction, long chunks about half)."""
        model = self.model
        S, L = model.seq_len, min(model.chunk_lens)
        if len(arr) < S:
            return 0.0
        starts = np.linspace(0, len(arr) - S, self.PROBE_SEQUENCES).astype(int)
        x = torch.from_numpy(np.stack([arr[a:a + S] for a in starts]).astype(np.int64))
        with torch.no_grad():
            clean, v = model.split(x, L)
            z = torch.zeros(v.shape + (2,), dtype=torch.float64)
            log_p = model(z, torch.zeros(v.shape[:2], dtype=torch.float64), model.context(clean, L))
            bits = model.family.reconstruction(log_p, v).sum().item() / math.log(2)
        return self.PROBE_RATIO[L == 1] * bits * len(arr) / v.shape[:3].numel()

