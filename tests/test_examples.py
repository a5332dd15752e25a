"""Each script under examples/ runs end to end with tiny settings and exits 0."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.datasets import DEFAULT_FASHION_MNIST_ROOT, TEXT_CORPORA

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAVE_FASHION = os.path.isfile(os.path.join(DEFAULT_FASHION_MNIST_ROOT,
                                           "train-images-idx3-ubyte.gz"))
HAVE_CORPUS = os.path.isfile(os.path.join(TEXT_CORPORA["kjv"][0], "ot.bzz"))


def run_example(name: str, *args: str, cwd=None) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, (
        f"{name} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn (digits) is not installed")
def test_mlp_digits():
    out = run_example("mlp_digits.py", "--epochs", "2")
    assert "epoch   2/2" in out and "test accuracy:" in out


@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn (digits) is not installed")
def test_cnn_digits():
    out = run_example("cnn_digits.py", "--epochs", "1")
    assert "epoch   1/1" in out and "test accuracy:" in out


@pytest.mark.skipif(not HAVE_FASHION, reason="Fashion-MNIST is not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_cnn_fashion_mnist():
    out = run_example("cnn_fashion_mnist.py", "--epochs", "1", "--limit", "500")
    assert "500 training and 500 test images" in out and "test accuracy:" in out


def test_cnn_fashion_mnist_without_data(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "cnn_fashion_mnist.py"),
                           "--root", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not HAVE_CORPUS, reason="the KJV corpus is not installed "
                    "(apt-get install sword-text-kjv)")
def test_char_gpt():
    out = run_example("char_gpt.py", "--steps", "20", "--n-layer", "1", "--n-embd", "32",
                      "--block-size", "16", "--batch-size", "8", "--eval-interval", "10",
                      "--eval-iters", "2", "--sample-chars", "30")
    assert "unigram baseline" in out and "val loss" in out and "-- sample" in out


@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn (digits) is not installed")
def test_demo(tmp_path):
    out = run_example("demo.py", "--epochs", "2", "--checkpoint",
                      str(tmp_path / "ckpt.safetensors"), cwd=tmp_path)
    assert "predictions match" in out
