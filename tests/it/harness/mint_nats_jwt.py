"""Mint a NATS operator, a system account, an account with JetStream and one user of it, signed
with Ed25519 nkeys, for the test harness's `nats-server` in JWT (decentralised auth) mode.

    python3 mint_nats_jwt.py DIR   writes DIR/operator.conf (to include in the server config)
                                   and DIR/user.creds (the client's credentials file)

Only `cryptography` is needed (installed by scripts/setup.sh). Written from the nkeys and JWT v2
formats: a public key or seed is base32 (no padding) of prefix bytes + key + CRC-16/XMODEM
(little-endian); a JWT is header.claims.signature, base64url without padding, signed by the
issuer's key.
"""
import base64, hashlib, json, sys, time, os
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization

def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc

def b32(b):
    return base64.b32encode(b).decode().rstrip("=")

PREFIX = {"O": 14 << 3, "A": 0, "U": 20 << 3}

def nkey(kind):
    sk = Ed25519PrivateKey.generate()
    raw = sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    p = bytes([PREFIX[kind]]) + pub
    public = b32(p + crc16(p).to_bytes(2, "little"))
    t = PREFIX[kind]
    s = bytes([(18 << 3) | (t >> 5), (t & 31) << 3]) + raw
    seed = b32(s + crc16(s).to_bytes(2, "little"))
    return sk, public, seed

def b64(b):
    return base64.urlsafe_b64encode(b).decode().rstrip("=")

def jwt(signer, iss, sub, name, nats):
    claims = {"iat": int(time.time()), "iss": iss, "name": name, "sub": sub, "nats": nats}
    body = json.dumps(claims, separators=(",", ":")).encode()
    claims["jti"] = b32(hashlib.sha256(body).digest())
    head = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = signer.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{b64(sig)}"

out = sys.argv[1]
osk, opk, _ = nkey("O")
ask, apk, _ = nkey("A")
usk, upk, useed = nkey("U")
op = jwt(osk, opk, opk, "op", {"type": "operator", "version": 2})
limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
          "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
acc = jwt(osk, opk, apk, "acc", {"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2})
ssk, spk, _ = nkey("A")
sysacc = jwt(osk, opk, spk, "SYS", {"limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2})
usr = jwt(ask, apk, upk, "user", {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2})
with open(os.path.join(out, "operator.conf"), "w") as f:
    f.write(f'operator: "{op}"\nsystem_account: {spk}\nresolver: MEMORY\nresolver_preload: {{\n  {apk}: "{acc}"\n  {spk}: "{sysacc}"\n}}\n')
with open(os.path.join(out, "user.creds"), "w") as f:
    f.write(f"-----BEGIN NATS USER JWT-----\n{usr}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{useed}\n------END USER NKEY SEED------\n")
