"""WSGI apps served by gunicorn / granian during the HTTP benchmarks.

`bare_app` is the floor: a Flask POST endpoint that reads the body and answers
202 with a tiny JSON, no project code. The real collector is served from
`collector.wsgi:create_app_from_env` (granian via `tally collector`, gunicorn directly).
"""

from __future__ import annotations

from flask import Flask, Response, request

bare_app = Flask(__name__)


@bare_app.post("/collect")
def bare_collect() -> Response:
    request.get_data()
    return Response(b'{"accepted":1}', status=202, mimetype="application/json")
