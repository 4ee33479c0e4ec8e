"""``rsvl serve``: every task over HTTP, raster jobs, map tiles, OpenAI-compatible chat and a
web page (see :mod:`rsvl.serve.app`)."""
