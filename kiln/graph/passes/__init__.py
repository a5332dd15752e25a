"""Graph passes: pure functions Graph -> Graph, one module each."""
