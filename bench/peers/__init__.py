"""One module per benchmark peer (``<peer>_peer.py``), each implementing the interface that
bench/protocol.py documents.  Framework imports happen inside ``setup``, never at import time,
so the runner can read mode lists without loading any framework."""
