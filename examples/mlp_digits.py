"""Train a multilayer perceptron on scikit-learn's 8x8 digits and report its test accuracy.

    python examples/mlp_digits.py [--epochs 30] [--hidden 256] [--lr 3e-3] [--seed 0]
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


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, hidden: int = 256, classes: int = 10,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: kiln.Tensor) -> kiln.Tensor:
        return self.net(x)


@kiln.no_grad()
def evaluate(model: nn.Module, x: kiln.Tensor, y: kiln.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``."""
    model.eval()
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, accuracy


def train(epochs: int = 30, hidden: int = 256, lr: float = 3e-3, batch_size: int = 32,
          seed: int = 0, verbose: bool = True) -> float:
    """Train the MLP and return its test accuracy."""
    kiln.manual_seed(seed)
    x, y = load_digits(flatten=True)  # (1797, 64) float32 in [0, 1], int64 labels
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, seed=seed,
                                                        stratify=y)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True)
    if verbose:
        print(f"digits: {len(x_train)} training and {len(x_test)} test samples of 64 pixels")

    model = MLP(hidden=hidden)
    optimizer = kiln.optim.Adam(model.parameters(), lr=lr)
    scheduler = kiln.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
            count += len(xb)
        scheduler.step()
        if verbose:
            test_loss, test_acc = evaluate(model, x_test, y_test)
            print(f"epoch {epoch + 1:3d}/{epochs}  train loss {total / count:.4f}  "
                  f"test loss {test_loss:.4f}  test acc {test_acc:.2%}  "
                  f"({time.perf_counter() - start:.1f} s)")
    _, accuracy = evaluate(model, x_test, y_test)
    if verbose:
        print(f"test accuracy: {accuracy:.2%}")
    return accuracy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train(args.epochs, args.hidden, args.lr, args.batch_size, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
