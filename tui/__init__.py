"""microseg.tui: the live Textual view (``microseg top``)."""
