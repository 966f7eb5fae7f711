"""WSGI apps served by gunicorn / granian during the HTTP benchmarks.

`bare_app` is the floor: a Flask POST endpoint that reads the body and answers
202 with a tiny JSON, no project code. `collector_app` is the real collector,
built from TALLY_* variables (used for granian; gunicorn runs `tally collector`).
"""

from __future__ import annotations

import os

from flask import Flask, Response, request

bare_app = Flask(__name__)


@bare_app.post("/collect")
def bare_collect() -> Response:
    request.get_data()
    return Response(b'{"accepted":1}', status=202, mimetype="application/json")


def collector_app():  # noqa: ANN201 - a granian --factory target
    from collector.app import create_app
    from tally.config import Settings

    return create_app(Settings.from_env(os.environ))
