"""The reference server's ASGI application for a third-party ASGI server (``server_compare.py``).

``TP_MODEL`` names the model file (input 1x8x8, output spec top1), as ``load_serve.py`` serves it.
"""

from __future__ import annotations

import os

from tamperprobe.server.app import create_app
from tamperprobe.server.holder import make_holder

app = create_app(make_holder(os.environ["TP_MODEL"], input_shape=(1, 8, 8)), output_spec="top1")
