#!/usr/bin/env python3
"""Write a layer tarball of real files (binaries, libraries, text) for the benchmark images.

usage: bench-images.py OUT.tar TARGET_MB SEED ROOT [ROOT...]
Files are taken in a deterministic order from the roots until TARGET_MB is reached; SEED shifts
the starting point so that layers built with different seeds hold different files, and a small
/bench-seed file makes every layer's content (and so its diff id) unique (BENCH_SALT, when set,
goes into it too).
"""
import io, os, sys, tarfile

out, target_mb, seed, roots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
files = []
for root in roots:
    for d, dirs, names in os.walk(root):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                try:
                    files.append((p, os.path.getsize(p)))
                except OSError:
                    pass
if not files:
    sys.exit(f"no files under {roots}")
start = (seed * 7919) % len(files)
files = files[start:] + files[:start]
budget = target_mb * 1_000_000
with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
    # BENCH_SALT (optional) makes the layer differ from one of the same seed and roots.
    salt = os.environ.get("BENCH_SALT", "")
    data = (f"seed {seed}\n" + (f"salt {salt}\n" if salt else "")).encode()
    ti = tarfile.TarInfo("bench-seed"); ti.size = len(data); ti.mtime = 0
    t.addfile(ti, io.BytesIO(data))
    total = 0
    for p, size in files:
        if total >= budget:
            break
        if size > budget // 4:
            continue
        try:
            ti = t.gettarinfo(p, arcname=f"l{seed}" + p)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
            with open(p, "rb") as f:
                t.addfile(ti, f)
            total += size
        except OSError:
            pass
print(f"{out}: {total / 1e6:.0f} MB from {roots}")
