"""Train a LeNet-style CNN on Fashion-MNIST and report its test accuracy.

    python examples/cnn_fashion_mnist.py [--epochs 5] [--limit 10000] [--root DIR]

About 15 s per epoch on 2 CPU cores; the test accuracy is about 89% after the default 5 epochs.
The data comes from Debian's dataset-fashion-mnist package (``apt-get install
dataset-fashion-mnist``) or any directory holding the four IDX files (``--root``).
"""

from __future__ import annotations

import argparse
import sys
import time

import kiln
import kiln.nn as nn
import kiln.nn.functional as F
from kiln.datasets import FashionMNIST
from kiln.utils.data import DataLoader, Subset


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max-pooling: 28x28 -> 6@14x14 -> 16@5x5 -> 120 -> 84 -> 10."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x: kiln.Tensor) -> kiln.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = kiln.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@kiln.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` over ``loader``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
        count += len(y)
    return total_loss / count, correct / count


def limited(dataset, limit: int | None):
    """The first ``limit`` samples of ``dataset`` (all of it when ``limit`` is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, range(limit))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--limit", type=int, default=None,
                    help="train and test on the first LIMIT images only (quick run)")
    ap.add_argument("--root", default=None, help="directory holding the IDX files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error("--epochs must be at least 1")

    kiln.manual_seed(args.seed)
    try:
        train_set = FashionMNIST(root=args.root, train=True).tensor_dataset()
        test_set = FashionMNIST(root=args.root, train=False).tensor_dataset()
    except FileNotFoundError as e:
        print(f"Fashion-MNIST is not available: {e}", file=sys.stderr)
        return 2
    train_set, test_set = limited(train_set, args.limit), limited(test_set, args.limit)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=1000)
    print(f"Fashion-MNIST: {len(train_set)} training and {len(test_set)} test images of 28x28")

    model = LeNet()
    optimizer = kiln.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = kiln.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=args.epochs * len(train_loader))
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        total, count = 0.0, 0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
        test_loss, test_acc = evaluate(model, test_loader)
        print(f"epoch {epoch + 1:2d}/{args.epochs}  train loss {total / count:.4f}  "
              f"test loss {test_loss:.4f}  test acc {test_acc:.2%}  "
              f"({time.perf_counter() - start:.1f} s)")
    print(f"test accuracy: {test_acc:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
