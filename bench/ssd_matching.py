"""Share of an SSD training step spent in target assignment (matching + box coding) and the MultiBox loss.

Times forward, matching + loss, and backward + optimizer step separately on a synthetic batch at each model's
default input size (the same batch as ``train_step.py``), and prints the matching + loss fraction of the step.

    python bench/ssd_matching.py
    python bench/ssd_matching.py --models ssdlite --objects 20
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from train_step import CASES, synthetic_batch

log = logging.getLogger(__name__)

SSD_MODELS = ["ssd300", "ssdlite"]


def phase_seconds(model: torch.nn.Module, batch: dict, warmup: int, iterations: int) -> tuple[float, float, float]:
    """Median seconds of (forward, matching + loss, backward + step)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    samples = []
    for k in range(warmup + iterations):
        start = time.perf_counter()
        outputs = model(batch["images"])
        forward = time.perf_counter()
        losses = model.loss(outputs, batch)
        loss = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        done = time.perf_counter()
        if k >= warmup:
            samples.append((forward - start, loss - forward, done - loss))
    return tuple(statistics.median(s[i] for s in samples) for i in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=SSD_MODELS, default=SSD_MODELS)
    parser.add_argument("--objects", type=int, default=4, help="objects per image")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    lines = [
        f"SSD step phases on CPU, {args.threads} threads, {args.objects} objects/image, median of {args.iterations}",
        "   model  batch  forward s  match+loss s  backward s  match+loss %",
    ]
    for case in (c for c in CASES if c.name in args.models):
        model, img_size = case.build()
        batch = synthetic_batch(case.batch_size, img_size, args.objects)
        forward, loss, backward = phase_seconds(model, batch, args.warmup, args.iterations)
        share = 100 * loss / (forward + loss + backward)
        lines.append(
            f"{case.name:>8}  {case.batch_size:>5}  {forward:>9.3f}  {loss:>12.4f}  {backward:>10.3f}  {share:>11.1f}%"
        )
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
