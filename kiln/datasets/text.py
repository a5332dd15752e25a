"""A public-domain text corpus for character-level language models, and a character tokenizer.

The corpus is the King James Version of the Bible (1611, public domain; over 4 MB of text) as
shipped by Debian's ``sword-text-kjv`` package (``apt-get install sword-text-kjv``; Debian's
copyright file gives ``License: public-domain``).  The World English Bible, also public domain,
is available as ``name="web"`` from ``sword-text-web``.  The files are CrossWire SWORD "zText"
modules - zlib-compressed blocks indexed per verse - read here with ``zlib`` and ``struct``.
(Debian's ``bible-kjv-text`` has the same text, but in a bespoke compression format.)
"""

from __future__ import annotations

import functools
import html
import os
import re
import struct
import zlib

import numpy as np

from kiln.tensor import Tensor, _make

__all__ = ["load_text_corpus", "CharTokenizer", "TEXT_CORPORA"]

_SWORD = "/usr/share/sword/modules/texts/ztext"
#: name -> (SWORD module directory, Debian package, description)
TEXT_CORPORA = {
    "kjv": (f"{_SWORD}/engKJV2006eb", "sword-text-kjv",
            "King James Version of the Bible (1611), public domain"),
    "web": (f"{_SWORD}/engWEB2015eb", "sword-text-web",
            "World English Bible with Deuterocanon, public domain"),
}

_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)  # footnotes are not part of the text
_TAG = re.compile(r"<[^>]*>")
_USFM = re.compile(r"\\[a-z]+\d*\*? ?")  # stray USFM markers (e.g. "\nd ") left in a few verses
_SPACE = re.compile(r"\s+")


def load_text_corpus(name: str = "kjv", root=None) -> str:
    """The text of a public-domain corpus as one string, one verse (or heading) per line.

    ``name="kjv"`` (default): the King James Bible from Debian's ``sword-text-kjv``, about
    4.2 million characters and 31,000 lines of early-modern English, licence: public domain.
    ``name="web"``: the World English Bible from ``sword-text-web`` (public domain).
    ``root`` overrides the SWORD module directory.  Markup and footnotes are removed.
    A missing package raises ``FileNotFoundError`` with the install command.
    """
    if name not in TEXT_CORPORA:
        raise ValueError(f"load_text_corpus: unknown corpus {name!r} "
                         f"(available: {', '.join(TEXT_CORPORA)})")
    default_dir, package, _ = TEXT_CORPORA[name]
    directory = os.fspath(root) if root is not None else default_dir
    stamp = []
    for part in ("ot", "nt"):
        for ext in ("bzs", "bzv", "bzz"):
            p = os.path.join(directory, f"{part}.{ext}")
            if not os.path.isfile(p):
                raise FileNotFoundError(
                    f"load_text_corpus: {p!r} not found. Install the corpus with "
                    f"`apt-get install {package}` (Debian/Ubuntu), or pass root= a SWORD zText "
                    "module directory")
            st = os.stat(p)
            stamp.append((st.st_mtime_ns, st.st_size))
    return _read_ztext(os.path.abspath(directory), tuple(stamp))


@functools.lru_cache(maxsize=4)
def _read_ztext(directory: str, stamp: tuple) -> str:
    # ``stamp`` (the files' mtimes and sizes) is only part of the cache key.
    lines = []
    for part in ("ot", "nt"):
        base = os.path.join(directory, part)
        with open(base + ".bzs", "rb") as f:
            bzs = f.read()
        with open(base + ".bzz", "rb") as f:
            bzz = f.read()
        with open(base + ".bzv", "rb") as f:
            bzv = f.read()
        if len(bzs) % 12 or len(bzv) % 10:
            raise ValueError(f"load_text_corpus: corrupt SWORD index in {base!r}.bz[sv]")
        blocks = []
        for offset, size, usize in struct.iter_unpack("<III", bzs):
            try:
                block = zlib.decompress(bzz[offset:offset + size])
            except zlib.error as e:
                raise ValueError(f"load_text_corpus: corrupt block in {base + '.bzz'!r}: "
                                 f"{e}") from None
            if len(block) != usize:
                raise ValueError(f"load_text_corpus: corrupt block in {base + '.bzz'!r}")
            blocks.append(block)
        for block, start, size in struct.iter_unpack("<IIH", bzv):
            if size == 0:
                continue
            if block >= len(blocks):
                raise ValueError(f"load_text_corpus: corrupt verse index in {base + '.bzv'!r}")
            raw = blocks[block][start:start + size].decode("utf-8", errors="replace")
            text = _TAG.sub("", _NOTE.sub("", raw))
            text = _SPACE.sub(" ", _USFM.sub("", html.unescape(text))).strip()
            if text:
                lines.append(text)
    return "\n".join(lines) + "\n"


class CharTokenizer:
    """Maps characters to ids 0..vocab_size-1 (sorted by code point) and back.

    >>> tok = CharTokenizer("hello world")
    >>> tok.vocab_size, tok.encode("hold"), tok.decode(tok.encode("hold"))
    (8, [3, 5, 4, 1], 'hold')
    """

    def __init__(self, text_or_vocab) -> None:
        chars = sorted(set(text_or_vocab))
        if not chars:
            raise ValueError("CharTokenizer: empty vocabulary")
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise TypeError("CharTokenizer: expected a string or an iterable of characters")
        self.itos = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return len(self.itos)

    def _ids(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        ids_clipped = np.minimum(ids, len(self._codes) - 1)
        bad = self._codes[ids_clipped] != codes
        if bad.any():
            c = text[int(np.argmax(bad))]
            raise KeyError(f"CharTokenizer: character {c!r} is not in the vocabulary")
        return ids.astype(np.int64)

    def encode(self, text: str, return_tensor: bool = False):
        """Ids of the characters of ``text`` (a list, or an int64 tensor with
        ``return_tensor=True``, which is much faster for a whole corpus to build)."""
        ids = self._ids(text)
        return _make(ids) if return_tensor else ids.tolist()

    def decode(self, ids) -> str:
        """The string for a sequence of ids (list, numpy array or tensor)."""
        if isinstance(ids, Tensor):
            ids = ids._data
        arr = np.asarray(ids).reshape(-1)
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0
                         or arr.max() >= len(self.itos)):
            raise ValueError(f"CharTokenizer.decode: ids must be ints in [0, {len(self.itos)})")
        itos = self.itos
        return "".join(itos[i] for i in arr.tolist())
