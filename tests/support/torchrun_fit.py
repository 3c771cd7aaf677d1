"""Entry script for the torchrun test: 2 nodes × 2 processes, tp2 × sp2, two steps."""

import faulthandler
import sys

import lightning.pytorch as pl

from lightning_models import RecordingDiT
from vidpar.lightning import VidParStrategy

if __name__ == "__main__":
    # A hung rank prints every thread's stack and exits before the test's timeout, so the
    # test shows where it hung (the fit takes seconds; the whole run 20-35 s on 2 cores).
    faulthandler.dump_traceback_later(200, exit=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        num_nodes=2,
        strategy=VidParStrategy(tp=2, sp=2),
        max_steps=2,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(RecordingDiT(sys.argv[1]))
