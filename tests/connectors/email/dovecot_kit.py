"""A real Dovecot (Debian's dovecot-imapd) configured in a temporary directory, for the IMAP tests."""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.tools import require_tool

DOVECOT = "/usr/sbin/dovecot"
USER, PASSWORD = "agent", "agent-pw"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Dovecot:
    port: int  # plain IMAP (STARTTLS offered when the server has a certificate)
    root: Path
    tls_port: int | None = None  # IMAPS, when the server has a certificate

    @contextmanager
    def client(self) -> Iterator[imaplib.IMAP4]:
        imap = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        try:
            imap.login(USER, PASSWORD)
            yield imap
        finally:
            imap.logout()

    def append(self, raw: bytes, folder: str = "INBOX", flags: str | None = None) -> int:
        """APPENDs a mail; returns its UID."""
        with self.client() as imap:
            status, data = imap.append(folder, flags, None, raw)
            assert status == "OK", data
            match = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
            assert match is not None, data
            return int(match.group(1))

    def flags(self, folder: str = "INBOX") -> dict[int, str]:
        """UID -> FLAGS of every message in the folder."""
        with self.client() as imap:
            imap.select(folder)
            _status, data = imap.uid("FETCH", "1:*", "(UID FLAGS)")
            found: dict[int, str] = {}
            for item in data:
                if isinstance(item, bytes) and (match := re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", item)):
                    found[int(match.group(1))] = match.group(2).decode()
            return found

    def uidvalidity(self, folder: str) -> int:
        with self.client() as imap:
            _status, data = imap.status(folder, "(UIDVALIDITY)")
            match = re.search(rb"UIDVALIDITY (\d+)", data[0] or b"")
            assert match is not None
            return int(match.group(1))

    def create(self, folder: str) -> None:
        with self.client() as imap:
            imap.create(folder)

    def delete(self, folder: str) -> None:
        with self.client() as imap:
            imap.delete(folder)


def _ssl(tls: tuple[Path, Path] | None) -> str:
    if tls is None:
        return "ssl = no\n"
    cert, key = tls
    # ssl = yes offers TLS (IMAPS, STARTTLS) without requiring it: the other tests log in plainly.
    return f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n"


def _oauth2(root: Path, introspection_url: str | None) -> tuple[str, str]:
    """(extra SASL mechanisms, passdb block) that check OAuth2 bearer tokens at ``introspection_url``."""
    if introspection_url is None:
        return "", ""
    (root / "oauth2.conf").write_text(
        f"introspection_mode = post\nintrospection_url = {introspection_url}\n"
        "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
    )
    passdb = (
        f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {root}/oauth2.conf\n}}\n"
    )
    return " xoauth2 oauthbearer", passdb


def _config(
    root: Path,
    port: int,
    tls_port: int | None = None,
    tls: tuple[Path, Path] | None = None,
    oauth2_url: str | None = None,
) -> str:
    if os.getuid() == 0:
        # Dovecot refuses mail access as UID 0; the mail belongs to "nobody".
        uid, gid, extra = 65534, 65534, ""
    else:
        import grp
        import pwd

        uid, gid = os.getuid(), os.getgid()
        user, group = pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name
        extra = (
            f"default_login_user = {user}\ndefault_internal_user = {user}\ndefault_internal_group = {group}\n"
        )
    for sub in ("mail", "home"):
        (root / sub).mkdir()
        if os.getuid() == 0:
            os.chown(root / sub, uid, gid)
    (root / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    oauth2_mechanisms, oauth2_passdb = _oauth2(root, oauth2_url)
    return f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = /dev/stderr
protocols = imap
listen = 127.0.0.1
{_ssl(tls)}disable_plaintext_auth = no
auth_mechanisms = plain login{oauth2_mechanisms}
{extra}
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
{oauth2_passdb}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
mail_location = maildir:{root}/mail/%u
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port or 0}
  }}
}}
"""


@contextmanager
def dovecot(tls: tuple[Path, Path] | None = None, oauth2_url: str | None = None) -> Iterator[Dovecot]:
    """Starts ``dovecot -F`` on a free port; stops it and removes its directory afterwards.

    With ``tls`` (certificate and key files) it also listens for IMAPS and offers STARTTLS. With
    ``oauth2_url`` it also takes XOAUTH2 and OAUTHBEARER, asking that token-introspection endpoint.
    """
    binary = require_tool(DOVECOT, "dovecot-imapd")
    # Not under pytest's 0700 tmp dir: the unprivileged mail user must traverse the path.
    root = Path(tempfile.mkdtemp(prefix="ticketgate-dovecot-"))
    root.chmod(0o755)
    port = free_port()
    tls_port = free_port() if tls is not None else None
    (root / "dovecot.conf").write_text(_config(root, port, tls_port, tls, oauth2_url))
    process = subprocess.Popen(
        [binary, "-F", "-c", str(root / "dovecot.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    log: list[str] = []
    ready = threading.Event()

    def read_log() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line.decode(errors="replace"))
            if b"starting up" in line:
                ready.set()
        ready.set()  # ended: let the waiter see the failure

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        if not ready.wait(20) or process.poll() is not None:
            raise RuntimeError("dovecot did not start:\n" + "".join(log))
        yield Dovecot(port=port, root=root, tls_port=tls_port)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(5)
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(root, ignore_errors=True)
