"""Serve the collector under gunicorn (pre-fork, one spool segment per worker process)."""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from tally.config import Settings


class _Gunicorn(BaseApplication):
    def __init__(self, factory, options: dict[str, object]) -> None:  # noqa: ANN001
        self.factory = factory
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):  # noqa: ANN201
        return self.factory()


def _close_spool(worker) -> None:  # noqa: ANN001
    # Seal this worker's segment on a clean exit so the shipper can take it at once.
    spool = getattr(worker.wsgi, "extensions", {}).get("tally_spool")
    if spool is not None:
        spool.close()


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    from collector.app import create_app

    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "sync",
        "backlog": 2048,
        "keepalive": 5,
        "timeout": 30,
        "graceful_timeout": 10,
        "accesslog": None,
        "control_socket_disable": True,
        "worker_exit": lambda server, worker: _close_spool(worker),
    }
    _Gunicorn(lambda: create_app(settings), options).run()
