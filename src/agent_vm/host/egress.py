"""The egress proxy's host pieces: its own Python environment, and the CA it signs with.

The proxy is mitmproxy, used as a library in a process of its own. It lives in its own
virtual environment (``<state_dir>/egress/venv``, made on first use with pip from the
package index, like the image's packages come from the mirror) because mitmproxy pins
versions of h11 and cryptography that agent-vm's HTTP stack cannot share.

The CA is generated here, once per state directory, with openssl. Its private key stays
in ``<state_dir>/egress/ca`` (root's, 0700); only its certificate goes into images, so a
guest trusts the certificates the proxy makes but can never make one. It is RSA 2048:
mitmproxy signs its leaf certificates' handshakes with the CA's key, and the guest
verifies RSA signatures far faster than ECDSA ones (measured: an intercepted request
cost ~5 ms with RSA, ~7.5 ms with ECDSA P-256, under TCG).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent_vm.errors import NetworkError

MITMPROXY = "mitmproxy==11.0.2"  # the last release for Python 3.11 (Debian 12's)
DNSLIB = "dnslib==0.9.26"
CA_BASENAME = "mitmproxy"  # mitmproxy's file names: <basename>-ca.pem (key + cert)
CA_DAYS = 3650


def egress_dir(state_dir: Path) -> Path:
    return state_dir / "egress"


def venv_python(state_dir: Path) -> Path:
    return egress_dir(state_dir) / "venv" / "bin" / "python"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _run(argv: list[str], what: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise NetworkError(
            f"cannot {what}: {' '.join(tail) or exc}",
            hint="the egress proxy needs pip to reach the package index once",
        ) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"cannot {what}: {exc}") from None


def ensure_venv(state_dir: Path) -> Path:
    """The proxy's interpreter, its environment made first if missing (~10 s)."""
    python = venv_python(state_dir)
    marker = python.parent.parent / "agent-vm-ready"
    wanted = f"{MITMPROXY} {DNSLIB}\n"
    with _locked(egress_dir(state_dir) / ".venv.lock"):
        if marker.exists() and marker.read_text() == wanted:
            return python
        base = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        _run([base, "-m", "venv", "--clear", str(python.parent.parent)], "make the proxy's venv")
        _run([str(python), "-m", "pip", "install", "-q", MITMPROXY, DNSLIB], "install mitmproxy")
        marker.write_text(wanted)
    return python


def ca_dir(state_dir: Path) -> Path:
    return egress_dir(state_dir) / "ca"


def ca_cert(state_dir: Path) -> Path:
    """The CA's certificate (public: it goes into images)."""
    return ca_dir(state_dir) / f"{CA_BASENAME}-ca-cert.pem"


def ensure_ca(state_dir: Path) -> Path:
    """The CA, generated first if missing; returns its certificate's path."""
    directory = ca_dir(state_dir)
    cert = ca_cert(state_dir)
    with _locked(egress_dir(state_dir) / ".ca.lock"):
        if cert.exists() and (directory / f"{CA_BASENAME}-ca.pem").exists():
            return cert
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
        key = directory / "ca.key.tmp"
        made = directory / "ca.crt.tmp"
        _run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
             "-days", str(CA_DAYS), "-keyout", str(key), "-out", str(made),
             "-subj", "/O=agent-vm/CN=agent-vm egress proxy CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash"],
            "generate the egress proxy's CA",
        )  # fmt: skip
        combined = directory / f"{CA_BASENAME}-ca.pem"
        fd = os.open(combined, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key.read_text() + made.read_text())
        key.unlink()
        made.rename(cert)
    return cert


def ca_fingerprint(state_dir: Path) -> str:
    """What images record of the CA they trust (a new CA means new images)."""
    return hashlib.sha256(ensure_ca(state_dir).read_bytes()).hexdigest()[:16]
