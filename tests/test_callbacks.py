"""Callbacks: the EMA average against a hand-rolled recursion of the same formula."""

import functools
import math

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_det.callbacks import ModelEMA
from lightning_det.models.detector import Detector


class Regressor(Detector):
    def __init__(self):
        super().__init__(num_classes=1, optimizer=functools.partial(torch.optim.SGD, lr=0.2))
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, images):
        return self.conv(images)

    def loss(self, outputs, batch):
        value = (outputs - 1).square().mean()
        return {"loss": value}


class RecordWeights(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(pl_module.conv.weight.detach().clone())


def test_ema_follows_the_ramped_formula_and_is_what_the_checkpoint_holds(tmp_path):
    torch.manual_seed(0)
    batches = DataLoader([{"images": torch.randn(2, 3, 4, 4)} for _ in range(6)], batch_size=None)
    record, ema = RecordWeights(), ModelEMA(decay=0.9, ramp=3.0)
    model = Regressor()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[record, ema, saver])
    trainer.fit(model, train_dataloaders=batches)

    expected = record.seen[0]
    for updates, raw in enumerate(record.seen[1:], start=1):
        d = 0.9 * (1 - math.exp(-updates / 3.0))
        expected = expected * d + raw * (1 - d)

    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.allclose(checkpoint["state_dict"]["conv.weight"], expected, atol=1e-6)
    assert torch.allclose(checkpoint["current_model_state"]["conv.weight"], record.seen[-1])
    assert not torch.allclose(expected, record.seen[-1], atol=1e-3)
