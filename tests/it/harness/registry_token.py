"""A token server for the test harness's docker-registry in token-auth mode (distribution's
`auth: token:`), the bearer flow Harbor and Docker Hub use.

    python3 registry_token.py DIR

DIR holds `token.json` (written by the harness, mode 0600):
    {"user": ..., "password": ..., "service": ..., "issuer": ..., "tls": true|false}
and, when tls is true, `server.pem`/`server.key` (the harness CA's server certificate). The
script makes `signing.key` (EC P-256) and `signing.pem` (its self-signed certificate, the
registry's `rootcertbundle`) when they are missing, binds 127.0.0.1 on a free port, writes the
port to `token.port` (atomically: the harness waits for this file) and serves until killed.

    GET /token?service=S&scope=repository:NAME:ACTIONS[&scope=...]   (HTTP Basic, or none)

- Basic credentials that are not the user's: 401 with a distribution error body.
- The user's: a JWT granting every action each scope asks for, except on repositories under
  `readonly/`, where only `pull` is granted (a user short of the push right).
- No Authorization header: an anonymous token granting nothing (as distribution's token servers
  do), so the registry itself refuses with 401.
- `service` other than the configured one: 400.

The JWT is ES256 (signature r||s, 64 bytes, as JWS wants), its header carries `x5c` with the
signing certificate (base64 DER, not URL-safe), which distribution verifies against its
`rootcertbundle`; claims iss, sub, aud (a string, as distribution 2.8 reads it), exp, nbf, iat,
jti and `access`. Only `cryptography` beyond the standard library. The log (stderr) names the
user and the scopes, never a password or a token.
"""
import base64, datetime, hmac, json, os, secrets, ssl, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, parse_qs

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

LIFETIME = 300


def b64url(b):
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def signing_material(d):
    key_path, pem_path = os.path.join(d, "signing.key"), os.path.join(d, "signing.pem")
    if not (os.path.exists(key_path) and os.path.exists(pem_path)):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bkbundle test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        with open(pem_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    with open(pem_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return key, base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def jwt(key, x5c, claims):
    head = b64url(json.dumps({"typ": "JWT", "alg": "ES256", "x5c": [x5c]}, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    der = key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{head}.{body}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def parse_scope(s):
    """`repository:NAME:a,b` -> (type, name, [actions]); the name may hold ':' (a port)."""
    kind, _, rest = s.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


def main():
    d = sys.argv[1]
    with open(os.path.join(d, "token.json")) as f:
        conf = json.load(f)
    key, x5c = signing_material(d)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status, doc, extra=()):
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path != "/token":
                return self.reply(404, {"errors": [{"code": "NOT_FOUND", "message": "no such path"}]})
            q = parse_qs(url.query)
            service = q.get("service", [""])[0]
            if service != conf["service"]:
                return self.reply(400, {"errors": [{"code": "UNSUPPORTED", "message": f"unknown service {service!r}"}]})
            user = None
            auth = self.headers.get("Authorization")
            if auth is not None:
                scheme, _, value = auth.partition(" ")
                try:
                    given_user, _, given_pw = base64.b64decode(value.strip()).decode().partition(":")
                except Exception:
                    given_user, given_pw = "", None
                ok = (
                    scheme.lower() == "basic"
                    and given_pw is not None
                    and hmac.compare_digest(given_user.encode(), conf["user"].encode())
                    and hmac.compare_digest(given_pw.encode(), conf["password"].encode())
                )
                if not ok:
                    self.log_message("refused credentials for user %r", given_user)
                    return self.reply(
                        401,
                        {"errors": [{"code": "UNAUTHORIZED", "message": "authentication failed"}]},
                        [("WWW-Authenticate", 'Basic realm="bkbundle-test-token"')],
                    )
                user = given_user
            access = []
            if user is not None:
                for s in q.get("scope", []):
                    for part in s.split(" "):
                        p = parse_scope(part)
                        if p:
                            actions = p[2]
                            if p[1].startswith("readonly/"):
                                actions = [a for a in actions if a == "pull"]
                            access.append({"type": p[0], "name": p[1], "actions": actions})
            now = int(time.time())
            claims = {
                "iss": conf["issuer"],
                "sub": user or "",
                "aud": service,
                "exp": now + LIFETIME,
                "nbf": now - 10,
                "iat": now,
                "jti": secrets.token_hex(16),
                "access": access,
            }
            token = jwt(key, x5c, claims)
            self.log_message("token for %s: %s", user or "(anonymous)", json.dumps(access))
            issued = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.reply(200, {"token": token, "access_token": token, "expires_in": LIFETIME, "issued_at": issued})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    if conf.get("tls"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(d, "server.pem"), os.path.join(d, "server.key"))
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    tmp = os.path.join(d, "token.port.tmp")
    with open(tmp, "w") as f:
        f.write(str(srv.server_address[1]))
    os.replace(tmp, os.path.join(d, "token.port"))
    sys.stderr.write(f"registry_token: listening on 127.0.0.1:{srv.server_address[1]}\n")
    sys.stderr.flush()
    srv.serve_forever()


if __name__ == "__main__":
    main()
