#!/usr/bin/env python3
"""Plays an agent host's bootstrap against what bkbundle installed, for the agent-host test.

Starts from what a real bootstrap gets, the server's address and the cloud region id, and does
what the real agent does with the rows and objects bkbundle wrote:

  fetch_session      GET {server}/api/v1/node_mgmt/open_api/installer_session?region=..&os=..&arch=..
  ca_from_server     only when the env says tls but holds no CA (releases whose env column cannot
                     hold one): the controller package downloaded from the server
                     (GET {server}/api/v1/node_mgmt/open_api/download?key=..), its certs/ca.crt
                     then the CA NATS is verified against
  connect_nats       NATS_SERVERS with the scheme NATS_PROTOCOL names; TLS verified against the CA
                     PEM of the region env (NATS_TLS_CA) and the server's name or address in
                     NATS_SERVERS; the env's user and password
  open_bucket        the session's object store bucket
  get_installer      the installer at its key; size and SHA-256 against the object's info
  get_package        the controller package at its key; the same checks
  unpack_package     the zip: one top-level fusion-collectors/, no path leaving it
  check_ca           fusion-collectors/certs/ca.crt present and equal to NATS_TLS_CA
  render_sidecar     fusion-collectors/sidecar.yml with its placeholders replaced as upstream's
                     install.sh does (__SERVER__URL__ by the session's server_url, ...); none left
  check_server_url   the rendered server_url is an absolute http(s) URL with a host (never
                     `null/api/...`)

Prints one JSON line of findings on stdout and exits 0, or exits 1 after naming the first failed
step (in the JSON's `failed_step` and `error`, and on stderr). The client is nats-py, never
bkbundle. Python stdlib and nats-py only. --allow-plain accepts NATS_PROTOCOL=nats (then no CA
is checked); by default a region env that does not say `tls` is a failure.
"""

import argparse
import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import nats
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError

TOP = "fusion-collectors/"


class StepFailed(Exception):
    def __init__(self, step, message):
        super().__init__(message)
        self.step = step


def nats_digest(data):
    """The object store's digest form: `SHA-256=` + URL-safe base64 with padding."""
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


def fetch_session(server, region, os_name, arch):
    query = urllib.parse.urlencode({"region": region, "os": os_name, "arch": arch})
    url = "%s/api/v1/node_mgmt/open_api/installer_session?%s" % (server.rstrip("/"), query)
    # No proxy, whatever the environment says: the agent host reaches the server directly.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=15) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace").strip()
        raise StepFailed("fetch_session", "GET %s: HTTP %d: %s" % (url, e.code, detail))
    except (urllib.error.URLError, OSError) as e:
        raise StepFailed("fetch_session", "GET %s: %s" % (url, getattr(e, "reason", e)))
    try:
        session = json.loads(body)
    except ValueError as e:
        raise StepFailed("fetch_session", "GET %s: not JSON (%s): %r" % (url, e, body[:200]))
    storage = session.get("storage") or {}
    missing = [k for k in ("bucket", "file_key", "file_name", "nats_servers", "nats_protocol", "nats_username", "nats_password") if not storage.get(k)]
    if missing or not (session.get("installer") or {}).get("file_key") or "server_url" not in session:
        raise StepFailed("fetch_session", "the session lacks %s" % (", ".join("storage." + k for k in missing) or "installer.file_key or server_url"))
    return session


def ca_from_server(server, key):
    """The controller package from the server (how agents got it before installers existed), and
    the CA in its certs/ca.crt."""
    url = "%s/api/v1/node_mgmt/open_api/download?%s" % (server.rstrip("/"), urllib.parse.urlencode({"key": key}))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=30) as r:
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise StepFailed("ca_from_server", "GET %s: %s" % (url, getattr(e, "reason", e)))
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        ca = z.read(TOP + "certs/ca.crt").decode()
    except (zipfile.BadZipFile, KeyError) as e:
        raise StepFailed("ca_from_server", "%s: no %scerts/ca.crt in the package the server sent: %s" % (key, TOP, e))
    if "BEGIN CERTIFICATE" not in ca:
        raise StepFailed("ca_from_server", "%s: %scerts/ca.crt holds no PEM certificate" % (key, TOP))
    return ca, nats_digest(data)


def nats_urls(storage, allow_plain):
    protocol = storage["nats_protocol"].strip().lower()
    if protocol not in ("tls", "nats"):
        raise StepFailed("connect_nats", "NATS_PROTOCOL is %r: expected tls (or nats)" % protocol)
    if protocol != "tls" and not allow_plain:
        raise StepFailed("connect_nats", "NATS_PROTOCOL is %r: agents must get tls (run with --allow-plain to accept plain text)" % protocol)
    urls = []
    for item in storage["nats_servers"].split(","):
        item = item.strip()
        if not item:
            continue
        if "://" in item:
            scheme = item.split("://", 1)[0].lower()
            if protocol == "tls" and scheme != "tls":
                raise StepFailed("connect_nats", "NATS_SERVERS entry %r is not tls:// while NATS_PROTOCOL is tls" % item)
            urls.append(item)
        else:
            urls.append("%s://%s" % (protocol, item))
    if not urls:
        raise StepFailed("connect_nats", "NATS_SERVERS is empty")
    return protocol, urls


async def connect(storage, allow_plain):
    protocol, urls = nats_urls(storage, allow_plain)
    tls = None
    if protocol == "tls":
        ca = storage.get("nats_tls_ca") or ""
        if "BEGIN CERTIFICATE" not in ca:
            raise StepFailed("connect_nats", "NATS_PROTOCOL is tls but NATS_TLS_CA holds no PEM certificate")
        try:
            tls = ssl.create_default_context(cadata=ca)
        except ssl.SSLError as e:
            raise StepFailed("connect_nats", "NATS_TLS_CA is not a usable CA certificate: %s" % e)
    errors = []

    async def on_error(e):
        errors.append("%s: %s" % (type(e).__name__, e))

    try:
        nc = await nats.connect(
            servers=urls,
            user=storage["nats_username"],
            password=storage["nats_password"],
            tls=tls,
            tls_hostname=None,
            connect_timeout=10,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=on_error,
        )
    except Exception as e:  # nats-py raises many kinds: name them all the same way
        seen = "; ".join(dict.fromkeys(errors)) or "%s: %s" % (type(e).__name__, e)
        raise StepFailed("connect_nats", "%s (%s%s): %s" % (
            ", ".join(urls), "TLS verified against NATS_TLS_CA" if tls else "plain text",
            ", user %s" % storage["nats_username"], seen))
    return nc, protocol, urls


async def get_object(obs, key, step):
    try:
        info = await obs.get_info(key)
    except (ObjectNotFoundError, NotFoundError):
        raise StepFailed(step, "object %r is not in the bucket" % key)
    try:
        result = await obs.get(key)
    except Exception as e:
        raise StepFailed(step, "object %r: download failed: %s: %s" % (key, type(e).__name__, e))
    data = result.data
    digest = nats_digest(data)
    if info.digest != digest:
        raise StepFailed(step, "object %r: SHA-256 of the download is %s, the object info says %s" % (key, digest, info.digest))
    if info.size != len(data):
        raise StepFailed(step, "object %r: %d bytes downloaded, the object info says %d" % (key, len(data), info.size))
    if not data:
        raise StepFailed(step, "object %r is empty" % key)
    return data, {"key": key, "size": len(data), "digest": digest, "description": getattr(info, "description", None)}


def unpack(data, dest):
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise StepFailed("unpack_package", "not a zip archive: %s" % e)
    names = z.namelist()
    for name in names:
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or ".." in parts:
            raise StepFailed("unpack_package", "entry %r leaves the package" % name)
        if not name.startswith(TOP):
            raise StepFailed("unpack_package", "entry %r is outside the one top-level %s" % (name, TOP))
    for required in ("sidecar.yml", "collector-sidecar"):
        if TOP + required not in names:
            raise StepFailed("unpack_package", "%s%s is missing (entries: %s)" % (TOP, required, ", ".join(sorted(names))))
    z.extractall(dest)
    for info in z.infolist():
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(os.path.join(dest, info.filename), mode)
    return sorted(names)


def render_sidecar(text, session):
    """Upstream's install.sh: `sed s|__SERVER__URL__|$SERVER_URL|g` and the like. The older
    placeholders (the demo's first package) are filled the same way."""
    tags = '"zone:%s", "group:%s"' % (session.get("zone_id", ""), session.get("group_id", ""))
    arch = session.get("cpu_architecture") or ""
    if arch:
        tags += ', "cpu_architecture:%s"' % arch
    values = {
        "__SERVER__URL__": str(session.get("server_url")),
        "__SERVER__API__TOKEN__": session.get("api_token", ""),
        "__TAGS__": tags,
        "__NODE__NAME__": session.get("node_name", ""),
        "__NODE__ID__": session.get("node_id", ""),
        "__CLOUD__REGION__ID__": session.get("zone_id", ""),
        "__GROUP__ID__": session.get("group_id", ""),
    }
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    left = sorted(set(re.findall(r"__[A-Z]+(?:__?[A-Z]+)*__", text)))
    if left:
        raise StepFailed("render_sidecar", "placeholders left in sidecar.yml: %s" % ", ".join(left))
    return text


def check_server_url(rendered):
    m = re.search(r'^server_url:\s*"([^"]*)"\s*$', rendered, re.M)
    if not m:
        raise StepFailed("check_server_url", "the rendered sidecar.yml has no server_url line")
    url = m.group(1)
    u = urllib.parse.urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise StepFailed("check_server_url", "server_url is %r: not an absolute http(s) URL (the region's NODE_SERVER_URL is missing or wrong)" % url)
    if u.hostname in ("null", "none", "undefined"):
        raise StepFailed("check_server_url", "server_url is %r: its host is %r" % (url, u.hostname))
    return url


async def bootstrap(a, findings):
    session = fetch_session(a.server, a.region, a.os, a.arch)
    storage = session["storage"]
    findings["session"] = {
        "server_url": session["server_url"],
        "bucket": storage["bucket"],
        "package_key": storage["file_key"],
        "installer_key": session["installer"]["file_key"],
        "nats_servers": storage["nats_servers"],
        "nats_protocol": storage["nats_protocol"],
        "credentials_from": session.get("credentials_from"),
    }
    if storage["nats_protocol"].strip().lower() == "tls" and "BEGIN CERTIFICATE" not in (storage.get("nats_tls_ca") or ""):
        storage["nats_tls_ca"], findings["package_from_server"] = ca_from_server(a.server, storage["file_key"])
        findings["ca_from"] = "the package the server sent"
    else:
        findings["ca_from"] = "NATS_TLS_CA"
    nc, protocol, urls = await connect(storage, a.allow_plain)
    findings["nats"] = {"urls": urls, "tls": protocol == "tls", "connected_url": str(nc.connected_url.geturl()) if nc.connected_url else None}
    try:
        js = nc.jetstream()
        try:
            obs = await js.object_store(storage["bucket"])
        except (BucketNotFoundError, NotFoundError):
            raise StepFailed("open_bucket", "bucket %r does not exist" % storage["bucket"])
        except Exception as e:
            raise StepFailed("open_bucket", "bucket %r: %s: %s" % (storage["bucket"], type(e).__name__, e))
        installer, findings["installer"] = await get_object(obs, session["installer"]["file_key"], "get_installer")
        package, findings["package"] = await get_object(obs, storage["file_key"], "get_package")
        sent = findings.get("package_from_server")
        if sent and sent != findings["package"]["digest"]:
            raise StepFailed("get_package", "the server sent %s with digest %s, the object store holds %s" % (storage["file_key"], sent, findings["package"]["digest"]))
    finally:
        await nc.close()

    os.makedirs(a.work, exist_ok=True)
    installer_path = os.path.join(a.work, os.path.basename(session["installer"]["file_key"]))
    with open(installer_path, "wb") as f:
        f.write(installer)
    os.chmod(installer_path, 0o755)
    with open(os.path.join(a.work, storage["file_name"]), "wb") as f:
        f.write(package)

    dest = os.path.join(a.work, "unpacked")
    findings["package"]["entries"] = len(unpack(package, dest))
    top = os.path.join(dest, TOP)

    ca_file = os.path.join(top, "certs", "ca.crt")
    if protocol == "tls":
        if not os.path.isfile(ca_file):
            raise StepFailed("check_ca", "%scerts/ca.crt is missing from %s" % (TOP, storage["file_key"]))
        with open(ca_file, encoding="utf-8") as f:
            packaged = f.read()
        if packaged.strip() != storage["nats_tls_ca"].strip():
            raise StepFailed("check_ca", "%scerts/ca.crt of %s is not the CA NATS was verified with (%s)" % (TOP, storage["file_key"], findings["ca_from"]))
        findings["ca_file"] = ca_file
    else:
        findings["ca_file"] = None

    step = "render_sidecar"
    try:
        with open(os.path.join(top, "sidecar.yml"), encoding="utf-8") as f:
            rendered = render_sidecar(f.read(), session)
    except OSError as e:
        raise StepFailed(step, str(e))
    with open(os.path.join(top, "sidecar.yml"), "w", encoding="utf-8") as f:
        f.write(rendered)
    findings["sidecar_server_url"] = check_server_url(rendered)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, help="the server's address as agents get it, e.g. http://198.18.0.1:8000")
    p.add_argument("--region", required=True, help="the cloud region id")
    p.add_argument("--work", required=True, help="directory for the downloads and the unpacked package")
    p.add_argument("--os", default="linux")
    p.add_argument("--arch", default="x86_64")
    p.add_argument("--allow-plain", action="store_true", help="accept NATS_PROTOCOL=nats (no TLS, no CA check)")
    a = p.parse_args()
    # asyncio's "returning true from eof_received() has no effect when using ssl" after every TLS
    # connection nats-py closes: noise on stderr, which the test shows when a step fails.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    findings = {"ok": False, "server": a.server, "region": a.region}
    try:
        asyncio.run(bootstrap(a, findings))
    except StepFailed as e:
        findings["failed_step"], findings["error"] = e.step, str(e)
        print(json.dumps(findings, sort_keys=True), flush=True)
        print("agent: %s failed: %s" % (e.step, e), file=sys.stderr)
        sys.exit(1)
    findings["ok"] = True
    print(json.dumps(findings, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
