#!/usr/bin/env python3
"""Stands in for the BK-Lite server's installer-session API, for the agent-host test.

The real bootstrap on an agent host starts from the server's address and a token; the server
answers with the session upstream's `server/apps/node_mgmt/services/installer_session.py` builds
(`InstallerSessionService.build_session_config`): where the agent's server is, where NATS is and
how to log in, which object store bucket and keys hold the installer and the controller package.
This stand-in builds the same answer from the same rows, read with `psql` from the database
bkbundle wrote:

  GET /api/v1/node_mgmt/open_api/installer_session?region=<id>&os=linux&arch=x86_64

- the region's `node_mgmt_sidecarenv` rows, `secret` rows decrypted like the server does
  (key = SHA-256 of SECRET_KEY; value = URL-safe base64 without padding of IV(16) || AES-256-CBC
  ciphertext, PKCS#7), with the independent `cryptography` package;
- the newest `node_mgmt_packageversion` controller row for the os (and the architecture, where
  the table has `cpu_architecture`);
- object keys as the release reads them: `{os}/{arch}/{object}/{version}/{name}` and
  `installer/{os}/{arch}/{file}` when the table has `cpu_architecture`, else
  `{os}/{object}/{version}/{name}` and `installer/{os}/{file}`.

Differences from upstream, on purpose: the region is given directly instead of through an install
token; NATS credentials are taken from NATS_INSTALLER_USERNAME/PASSWORD, else
NATS_ADMIN_USERNAME/PASSWORD (upstream's order), else NATS_USERNAME/NATS_PASSWORD (what the demo
recipe seeds), and the answer says which in `credentials_from`. A region without NODE_SERVER_URL
gets upstream's error (HTTP 500) unless `--missing-server-url null` asks for what the October 2025
field fork handed agents: the literal `null/api/v1/node_mgmt/open_api/node`.

Releases before April 2026 had no installer: agents got the controller package from the server,
which read it from the object store itself. With `--nats URL` (and `--nats-ca FILE`, the user
and password in NATS_USER / NATS_PASSWORD) the stand-in serves that too:

  GET /api/v1/node_mgmt/open_api/download?key=<object key>

This is how an agent of a release whose env cannot hold the CA (`sidecarenv.value` varchar(200)
before migration 0022) gets `certs/ca.crt` before it ever speaks to NATS.

The server's SECRET_KEY comes from the environment variable SECRET_KEY or --secret-key-file (never
the command line, which other users can read). Prints `listening on http://HOST:PORT` on stdout
once it serves (port 0 picks a free one). Python stdlib and `cryptography` only.
"""

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SESSION_PATH = "/api/v1/node_mgmt/open_api/installer_session"
DOWNLOAD_PATH = "/api/v1/node_mgmt/open_api/download"
NODE_API_SUFFIX = "/api/v1/node_mgmt/open_api/node"
ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}
INSTALLER_FILES = {"linux": "bklite-controller-installer", "windows": "bklite-controller-installer.exe"}


class SessionError(Exception):
    """An answer other than 200: the HTTP status and a message naming what is wrong."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def decrypt_secret(secret_key, value):
    """The server's AESCryptor.decode: returns the plain text, or raises ValueError saying why."""
    key = hashlib.sha256(secret_key.encode("utf-8")).digest()
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, TypeError) as e:
        raise ValueError("not URL-safe base64 (%s)" % e)
    if len(raw) < 32 or len(raw) % 16:
        raise ValueError("%d bytes after base64: expected a 16-byte IV and whole AES blocks" % len(raw))
    decryptor = Cipher(algorithms.AES(key), modes.CBC(raw[:16])).decryptor()
    padded = decryptor.update(raw[16:]) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise ValueError("bad padding: encrypted with another SECRET_KEY, or damaged")
    return plain.decode("utf-8")


def normalize_arch(arch):
    return ARCH_ALIASES.get((arch or "").strip().lower(), (arch or "").strip().lower())


class Database:
    """The few reads the session needs, through `psql` and a connection URL (variables passed
    with -v and quoted by psql, so no value is ever spliced into SQL)."""

    def __init__(self, url):
        self.url = url

    def query_json(self, sql, **variables):
        cmd = ["psql", self.url, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        for name, value in variables.items():
            cmd += ["-v", "%s=%s" % (name, value)]
        try:
            out = subprocess.run(cmd, input=sql, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise SessionError(500, "psql not found: apt-get install postgresql-client")
        if out.returncode != 0:
            raise SessionError(500, "psql failed (%d): %s" % (out.returncode, out.stderr.strip()))
        return json.loads(out.stdout.strip() or "null")

    def has_column(self, table, column):
        return self.query_json(
            "SELECT to_json(count(*) > 0) FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = :'t' AND column_name = :'c';\n",
            t=table,
            c=column,
        )


class Standin:
    def __init__(self, db, bucket, secret_key, missing_server_url):
        self.db = db
        self.bucket = bucket
        self.secret_key = secret_key
        self.missing_server_url = missing_server_url

    def region_env(self, region):
        exists = self.db.query_json(
            "SELECT to_json(count(*) > 0) FROM node_mgmt_cloudregion WHERE id = :'r'::bigint;\n", r=region
        )
        if not exists:
            raise SessionError(404, "cloud region %s does not exist (node_mgmt_cloudregion)" % region)
        rows = self.db.query_json(
            "SELECT coalesce(json_agg(json_build_object('key', key, 'value', value, 'type', type) ORDER BY key), '[]') "
            "FROM node_mgmt_sidecarenv WHERE cloud_region_id = :'r'::bigint;\n",
            r=region,
        )
        env = {}
        for row in rows:
            value = row["value"]
            if row["type"] == "secret":
                if self.secret_key is None:
                    raise SessionError(500, "region %s, %s is a secret and no SECRET_KEY was given" % (region, row["key"]))
                try:
                    value = decrypt_secret(self.secret_key, value or "")
                except ValueError as e:
                    raise SessionError(500, "region %s, %s: cannot decrypt: %s" % (region, row["key"], e))
            env[row["key"]] = value
        return env

    def controller(self, os_name, arch):
        with_arch = self.db.has_column("node_mgmt_packageversion", "cpu_architecture")
        cols = "os, object, version, name" + (", cpu_architecture" if with_arch else "")
        where = "type = 'controller' AND os = :'os'" + (" AND cpu_architecture = :'arch'" if with_arch else "")
        rows = self.db.query_json(
            "SELECT coalesce(json_agg(t), '[]') FROM (SELECT id, %s FROM node_mgmt_packageversion WHERE %s "
            "ORDER BY id DESC LIMIT 1) t;\n" % (cols, where),
            os=os_name,
            arch=arch,
        )
        if not rows:
            raise SessionError(
                500, "Package not found: no controller row for os %s%s in node_mgmt_packageversion"
                % (os_name, ", cpu_architecture %s" % arch if with_arch else "")
            )
        row = rows[0]
        if with_arch:
            key = "%s/%s/%s/%s/%s" % (row["os"], row["cpu_architecture"] or "generic", row["object"], row["version"], row["name"])
            installer = "installer/%s/%s/%s" % (os_name, arch or "generic", INSTALLER_FILES[os_name])
        else:
            key = "%s/%s/%s/%s" % (row["os"], row["object"], row["version"], row["name"])
            installer = "installer/%s/%s" % (os_name, INSTALLER_FILES[os_name])
        return row, key, installer

    def session(self, region, os_name, arch):
        if not region.isdigit():
            raise SessionError(400, "region must be a cloud region id (digits), got %r" % region)
        if os_name not in INSTALLER_FILES:
            raise SessionError(400, "Unsupported operating system: %s" % os_name)
        arch = normalize_arch(arch)
        env = self.region_env(region)
        server_url = env.get("NODE_SERVER_URL")
        if server_url:
            agent_url = server_url.rstrip("/") + NODE_API_SUFFIX
        elif self.missing_server_url == "null":
            agent_url = "null" + NODE_API_SUFFIX
        else:
            raise SessionError(500, "Missing NODE_SERVER_URL in cloud region %s" % region)
        credentials = None
        for user_key, password_key in (
            ("NATS_INSTALLER_USERNAME", "NATS_INSTALLER_PASSWORD"),
            ("NATS_ADMIN_USERNAME", "NATS_ADMIN_PASSWORD"),
            ("NATS_USERNAME", "NATS_PASSWORD"),
        ):
            if (env.get(user_key) or "").strip() and (env.get(password_key) or "").strip():
                credentials = (user_key, password_key)
                break
        nats_servers = env.get("NATS_SERVERS")
        if not nats_servers or credentials is None:
            raise SessionError(
                500, "Missing NATS direct download configuration in cloud region %s: NATS_SERVERS %s, credentials %s"
                % (region, "set" if nats_servers else "missing", "/".join(credentials) if credentials else "missing")
            )
        row, package_key, installer_key = self.controller(os_name, arch)
        return {
            "api_token": "standin-token-region-%s" % region,
            "group_id": "1",
            "install_dir": "/opt/fusion-collectors" if os_name == "linux" else "C:\\fusion-collectors",
            "node_id": "standin-node",
            "node_name": "agent-host",
            "os": os_name,
            "cpu_architecture": arch,
            "server_url": agent_url,
            "storage": {
                "bucket": self.bucket,
                "file_key": package_key,
                "file_name": row["name"],
                "nats_password": env[credentials[1]],
                "nats_protocol": (env.get("NATS_PROTOCOL") or "nats").strip().lower(),
                "nats_servers": nats_servers,
                "nats_tls_ca": env.get("NATS_TLS_CA") or "",
                "nats_username": env[credentials[0]],
            },
            "package": {
                "id": row["id"],
                "os": row["os"],
                "cpu_architecture": row.get("cpu_architecture") or arch or "generic",
                "object": row["object"],
                "version": row["version"],
                "name": row["name"],
                "file_key": package_key,
            },
            "installer": {"filename": INSTALLER_FILES[os_name], "object_key": installer_key, "file_key": installer_key},
            "zone_id": region,
            "credentials_from": "%s/%s" % credentials,
        }


def download(nats_url, ca_file, bucket, key):
    """The object's bytes, read from the object store as the server reads it (its own NATS
    connection, TLS verified against the site CA)."""
    import asyncio
    import ssl

    import nats

    async def get():
        tls = ssl.create_default_context(cafile=ca_file) if ca_file else None
        nc = await nats.connect(
            nats_url, user=os.environ.get("NATS_USER"), password=os.environ.get("NATS_PASSWORD"),
            tls=tls, connect_timeout=10, allow_reconnect=False, max_reconnect_attempts=0,
        )
        try:
            obs = await nc.jetstream().object_store(bucket)
            return (await obs.get(key)).data
        finally:
            await nc.close()

    try:
        return asyncio.run(get())
    except Exception as e:
        raise SessionError(404, "object %r in bucket %r: %s: %s" % (key, bucket, type(e).__name__, e))


def make_handler(standin, nats_url=None, ca_file=None):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if url.path.rstrip("/") == DOWNLOAD_PATH and nats_url:
                try:
                    data = download(nats_url, ca_file, standin.bucket, q.get("key", ""))
                except SessionError as e:
                    return self.answer(e.status, {"error": str(e)})
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if url.path.rstrip("/") != SESSION_PATH:
                return self.answer(404, {"error": "no such path %s (only %s)" % (url.path, SESSION_PATH)})
            try:
                body = standin.session(q.get("region", ""), q.get("os", "linux"), q.get("arch", "x86_64"))
            except SessionError as e:
                return self.answer(e.status, {"error": str(e)})
            self.answer(200, body)

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            sys.stderr.write("server-standin: %s %s\n" % (self.address_string(), fmt % args))

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to serve on (the agent host's HOST_IP; port 0 = any)")
    p.add_argument("--db", required=True, help="PostgreSQL connection URL of the platform database")
    p.add_argument("--bucket", required=True, help="the object store bucket (the server's NATS_NAMESPACE)")
    p.add_argument("--secret-key-file", help="file holding the server's SECRET_KEY (default: $SECRET_KEY)")
    p.add_argument("--missing-server-url", choices=["error", "null"], default="error",
                   help="a region without NODE_SERVER_URL: upstream's error, or the field fork's literal null")
    p.add_argument("--nats", help="the stack's NATS (tls://HOST:PORT) for the package download of releases before installers")
    p.add_argument("--nats-ca", help="the CA file the stand-in verifies that NATS with")
    a = p.parse_args()
    host, _, port = a.listen.rpartition(":")
    if not host or not port.isdigit():
        p.error("--listen must be HOST:PORT, got %r" % a.listen)
    if a.secret_key_file:
        with open(a.secret_key_file, encoding="utf-8") as f:
            secret_key = f.read().strip()
    else:
        secret_key = os.environ.get("SECRET_KEY")
    standin = Standin(Database(a.db), a.bucket, secret_key, a.missing_server_url)
    server = ThreadingHTTPServer((host, int(port)), make_handler(standin, a.nats, a.nats_ca))
    print("listening on http://%s:%d" % (host, server.server_address[1]), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
