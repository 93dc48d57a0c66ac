"""Training: it learns, and a resumed run continues exactly."""
import torch

from bfn_codec.train import Trainer, TrainConfig, learning_rate

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


def test_term_signal_stops_after_a_step_and_saves(tmp_path, corpus):
    """bfn-train on SIGTERM (or a first Ctrl-C): finishes the step, evaluates, saves, exits 0."""
    import json
    import signal
    import subprocess
    import time
    from conftest import cli
    out = tmp_path / "run"
    p = subprocess.Popen(cli("train_cmd", str(out), "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
                             "--chunk-len", "16", "--context-len", "16", "--data-dir", str(corpus),
                             "--val-bytes", "2048", "--val-offset", "0", "--batch-size", "4",
                             "--minutes", "10", "--threads", "1"),
                         stderr=subprocess.PIPE)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text()) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)                               # some training steps
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[-1]["step"] > 0 and (out / "ckpt.pt").exists()


def test_export_sets_the_default_coding_chunk_length_and_steps(tmp_path, corpus):
    import subprocess
    from conftest import TINY_SAR, cli
    from bfn_codec import codec, container
    from bfn_codec.model import load_weights
    Trainer(tmp_path / "run", TINY_SAR, tiny_train_config(corpus, max_steps=2, batch_size=2)).run()
    out = tmp_path / "w.pt"
    r = subprocess.run(cli("train_cmd", str(tmp_path / "run"), "--export", str(out), "--coding-chunk-len", "1",
                           "--coding-steps", "3"), capture_output=True)
    assert r.returncode == 0, r.stderr
    assert load_weights(out)[0].cfg.coding_chunk_len == 1
    header = container.unpack(codec.compress(b"chunk length one", str(out), fallback=False)[0])[0]
    assert (header.chunk_len, header.steps) == (1, 3)
    assert container.unpack(codec.compress(b"chunk length one", str(out), steps=5, fallback=False)[0])[0].steps == 5
    local = subprocess.run(cli("train_cmd", str(tmp_path / "run"), "--export", str(out), "--local-layers", "1",
                               "--local-window", "8"), capture_output=True)
    assert local.returncode == 0, local.stderr
    assert (load_weights(out)[0].cfg.local_layers, load_weights(out)[0].cfg.local_window) == (1, 8)
    for flag, value in [("--coding-chunk-len", "9"), ("--coding-steps", "0"), ("--coding-steps", "70000"),
                        ("--local-layers", "9"), ("--local-layers", "1")]:
        bad = subprocess.run(cli("train_cmd", str(tmp_path / "run"), "--export", str(out), flag, value),
                             capture_output=True)
        assert bad.returncode == 2, (flag, value)


def test_learning_rate_warms_up_then_cools_down_as_time_runs_out():
    tcfg = TrainConfig(lr=1e-3, warmup=10, cooldown_minutes=2.0)
    assert learning_rate(tcfg, 0, 1e9) == 1e-4
    assert learning_rate(tcfg, 50, 1e9) == 1e-3
    assert learning_rate(tcfg, 50, 60.0) == 5e-4            # half the cool-down left
    assert learning_rate(tcfg, 50, -1.0) == 0.0
    assert learning_rate(TrainConfig(lr=1e-3, warmup=10), 50, 1.0) == 1e-3     # no cool-down asked


def test_a_run_started_from_weights_takes_their_config_and_regroups_heads(tmp_path, corpus):
    """--init-from: a new run starts from a weights file's parameters and config; a model
    option given changes the config (kv_heads: the key/value heads averaged), and the run
    evaluates at the start about where the weights were, far below an untrained network."""
    import dataclasses
    import json
    from conftest import TINY_SAR
    from bfn_codec.model import load_weights, regroup_kv_heads, save_weights
    first = Trainer(tmp_path / "a", TINY_SAR, tiny_train_config(corpus, max_steps=120, batch_size=8))
    first.run()
    weights = tmp_path / "a.pt"
    save_weights(weights, first.ema)
    start = tiny_train_config(corpus, max_steps=1, batch_size=8, init_from=str(weights), lr=1e-9)
    same = Trainer(tmp_path / "b", dataclasses.replace(TINY_SAR, d_model=32), start, {"init_from"})
    assert same.mcfg == TINY_SAR                 # options not given come from the weights
    loaded = load_weights(weights, torch.float32)[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in same.net.state_dict().items())
    mqa = Trainer(tmp_path / "c", dataclasses.replace(TINY_SAR, kv_heads=1), start, {"init_from", "kv_heads"})
    assert mqa.mcfg == dataclasses.replace(TINY_SAR, kv_heads=1)
    pooled = regroup_kv_heads(loaded, TINY_SAR, 1)
    assert all(torch.equal(pooled[k], v) for k, v in mqa.net.state_dict().items())
    mqa.run()
    fresh = Trainer(tmp_path / "d", dataclasses.replace(TINY_SAR, kv_heads=1),
                    tiny_train_config(corpus, max_steps=1, batch_size=8, lr=1e-9))
    fresh.run()
    val = [json.loads((tmp_path / r / "log.jsonl").read_text().splitlines()[0])["val_total10"] for r in "cd"]
    assert val[0] < val[1] - 1.0, val
