"""wss://: daphne serving TLS with a certificate made for the test, and a real client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import websockets

from realtime.testing import session_for

from .conftest import free_port, need
from .factories import UserFactory
from .live import ROOT, database_url

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def self_signed(folder: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    need(openssl is not None, "openssl is not installed (the TLS test makes its certificate)")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            str(openssl),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert


def test_wss_through_daphne_with_a_certificate(tmp_path):
    key, cert = self_signed(tmp_path)
    user = UserFactory()
    session = session_for(user)
    port = free_port()
    trust = ssl.create_default_context(cafile=str(cert))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url(),
        "DEBUG": "1",
        "REDIS_URL": "",
    }
    endpoint = f"ssl:port={port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    log = open(tmp_path / "daphne.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-e", endpoint, "config.asgi:application"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/admin/login/", timeout=1, context=trust
                ).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "daphne.log").read_text()) from None
                time.sleep(0.2)

        async def scenario():
            async with websockets.connect(
                f"wss://127.0.0.1:{port}/ws/realtime/",
                ssl=trust,
                origin="https://127.0.0.1",
                additional_headers={"Cookie": f"sessionid={session}"},
            ) as socket:
                welcome = json.loads(await asyncio.wait_for(socket.recv(), 10))
                assert welcome["op"] == "welcome"
                await socket.send(json.dumps({"op": "ping", "ref": "tls"}))
                while True:
                    frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
                    if frame.get("op") == "pong":
                        assert frame["ref"] == "tls"
                        break
            # Plain ws:// to the TLS port does not get a socket.
            with pytest.raises((OSError, websockets.InvalidHandshake, asyncio.TimeoutError)):
                async with websockets.connect(
                    f"ws://127.0.0.1:{port}/ws/realtime/", open_timeout=3
                ):
                    pass
            # A client that does not trust the certificate refuses the server.
            with pytest.raises(ssl.SSLCertVerificationError):
                async with websockets.connect(
                    f"wss://127.0.0.1:{port}/ws/realtime/", ssl=ssl.create_default_context()
                ):
                    pass

        asyncio.run(scenario())
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
