"""Bundled and packaged data sets: sklearn's digits, Fashion-MNIST, a public-domain text corpus.

Nothing is downloaded at run time; each data set comes from a package:

- ``load_digits``: scikit-learn (``pip install "kiln[data]"``);
- ``FashionMNIST``: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``)
  or any directory holding the IDX files;
- ``load_text_corpus``: Debian's ``sword-text-kjv`` (``apt-get install sword-text-kjv``).
"""

from kiln.datasets.digits import load_digits, train_test_split
from kiln.datasets.fashion_mnist import DEFAULT_FASHION_MNIST_ROOT, FashionMNIST
from kiln.datasets.idx import read_idx, write_idx
from kiln.datasets.text import TEXT_CORPORA, CharTokenizer, load_text_corpus

__all__ = ["load_digits", "train_test_split", "FashionMNIST", "DEFAULT_FASHION_MNIST_ROOT",
           "read_idx", "write_idx", "load_text_corpus", "CharTokenizer", "TEXT_CORPORA"]
