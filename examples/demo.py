"""End-to-end demo: train a CNN on scikit-learn's 8x8 digits, report test accuracy, save a
checkpoint, reload it into a fresh model and check the predictions match.

    python examples/demo.py [--epochs 15] [--checkpoint digits_cnn.safetensors]
"""

from __future__ import annotations

import argparse
import sys
import time

import kiln
import kiln.nn as nn
import kiln.nn.functional as F
from kiln.datasets import load_digits, train_test_split
from kiln.utils.data import DataLoader, TensorDataset


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def progress(epoch: int, epochs: int, done: int, total: int, loss: float) -> None:
    """Redraw the epoch's progress bar in place; in a log (not a terminal), only its last state."""
    if done < total and not sys.stdout.isatty():
        return
    width = 30
    filled = int(width * done / total)
    bar = "#" * filled + "." * (width - filled)
    sys.stdout.write(f"\repoch {epoch + 1:2d}/{epochs} [{bar}] {done:4d}/{total} loss {loss:.4f}")
    if done == total:
        sys.stdout.write("\n")
    sys.stdout.flush()


@kiln.no_grad()
def predict(model: nn.Module, x: kiln.Tensor) -> kiln.Tensor:
    model.eval()
    return model(x).argmax(dim=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--checkpoint", default="digits_cnn.safetensors")
    args = ap.parse_args(argv)

    kiln.manual_seed(0)
    images, labels = load_digits()  # (1797, 1, 8, 8) float32 in [0, 1], int64 labels
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.25, seed=0)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size,
                        shuffle=True, generator=kiln.Generator().manual_seed(0))
    print(f"digits: {len(x_train)} training and {len(x_test)} test images of 8x8")

    model = make_model()
    opt = kiln.optim.Adam(model.parameters(), lr=2e-3)
    sched = kiln.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        seen = 0
        for xb, yb in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            seen += len(xb)
            progress(epoch, args.epochs, seen, len(x_train), loss.item())
        sched.step()
    train_s = time.perf_counter() - start

    pred = predict(model, x_test)
    accuracy = (pred == y_test).float().mean().item()
    print(f"test accuracy: {accuracy:.2%} ({train_s:.1f} s of training)")

    kiln.save(model.state_dict(), args.checkpoint)
    restored = make_model()
    restored.load_state_dict(kiln.load(args.checkpoint))
    same = bool((predict(restored, x_test) == pred).all())
    print(f"checkpoint {args.checkpoint}: reloaded, predictions "
          f"{'match' if same else 'DIFFER'}")
    return 0 if same and accuracy > 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
