"""The training loop's host work: the next chunk's data is drawn while the current chunk runs."""

import jax
import numpy as np

from precision_lab import train as train_mod
from precision_lab.config import run_config

MICRO = {"preset": "tiny", "d_model": 32, "d_ff": 64, "num_encoder_layers": 1, "num_decoder_layers": 1,
         "moe_every": 1, "num_experts": 4}


def test_next_chunks_data_is_drawn_before_this_chunk_is_waited_for(monkeypatch):
    """Order of host events: the batches of chunk i+1 are made after chunk i was dispatched and before its
    metrics are fetched (the fetch waits for the chunk), so data generation overlaps device work; every
    chunk's batches are drawn exactly once, and the summary says what the data cost."""
    events = []
    real_batches, real_get = train_mod.Trainer.batches, jax.device_get

    def batches(self, seeds, step0, k):
        events.append(("data", step0, k))
        return real_batches(self, seeds, step0, k)

    def device_get(x):
        events.append(("wait",))
        return real_get(x)

    monkeypatch.setattr(train_mod.Trainer, "batches", batches)
    monkeypatch.setattr(train_mod.jax, "device_get", device_get)
    # tests/test_train.py's micro run (batch 8, 10-step chunks, one seed): its compiled 10-step chunk is
    # reused; the 5-step tail (a last chunk shorter than chunk_steps) is the one program compiled here
    run = run_config({"model": MICRO, "train": {"steps": 25, "chunk_steps": 10, "eval_every": 0,
                                                "checkpoint_every": 0, "batch_size": 8}})
    result = train_mod.train(run, progress=False)
    loop = [e for e in events if e[0] == "data" or e == ("wait",)][:6]
    assert loop == [("data", 0, 10), ("data", 10, 10), ("wait",), ("data", 20, 5), ("wait",), ("wait",)]
    assert result.metrics["loss"].shape[0] == 25 and np.isfinite(result.metrics["loss"]).all()
    assert result.summary["timing"]["data_s"] > 0
