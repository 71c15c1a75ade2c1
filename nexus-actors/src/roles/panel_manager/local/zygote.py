# The first process of a warm gVisor sandbox (see warm.rs). It starts as the
# sandbox's root, loads what Python web panels load, says so on stderr and
# waits on stdin for its one job: {"uid": N, "env": [[k, v], ...], "argv": [...]}.
# It then becomes that uid for good and runs argv in /home/panel: a
# `python3 script.py ...` in this very interpreter, its imports already
# done; anything else by exec. It never runs a second job.
import ctypes
import json
import os
import sys

import hmac  # noqa: F401  (loaded ahead for the panel; see above)
import http.client  # noqa: F401
import http.server  # noqa: F401
import signal  # noqa: F401
import socketserver  # noqa: F401
import threading  # noqa: F401
import traceback  # noqa: F401
import urllib.error  # noqa: F401
import urllib.parse  # noqa: F401
import urllib.request  # noqa: F401
import runpy
import site

CODE = "/home/panel"
PR_CAPBSET_DROP = 24
# CAP_SETGID, CAP_SETUID, CAP_SETPCAP: all the zygote was given.
GIVEN_CAPS = (6, 7, 8)

sys.stderr.write("nexus-warm: ready\n")
line = sys.stdin.readline()
try:
    job = json.loads(line)
    uid, env, argv = int(job["uid"]), dict(job["env"]), [str(a) for a in job["argv"]]
    if uid <= 0 or not argv:
        raise ValueError("no uid or no argv")
except (ValueError, KeyError, TypeError) as error:
    sys.stderr.write(f"nexus-warm: a job it cannot run ({error})\n")
    sys.exit(70)

null = os.open("/dev/null", os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
os.environ.clear()
os.environ.update(env)
# Out of the bounding set too: nothing it runs can take them back.
libc = ctypes.CDLL(None, use_errno=True)
for cap in GIVEN_CAPS:
    if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
        sys.stderr.write(f"nexus-warm: could not drop capability {cap}\n")
        sys.exit(71)
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
# As the panel: the code is its own, 0700, and root here may not pass.
os.chdir(CODE)

# `python3` resolves as the zygote's own name did: this interpreter is the
# one the command asks for.
args = argv[1:]
if argv[0] == "python3" and args[:1] == ["-u"]:
    args = args[1:]

def shadowed(directory):
    """Whether the panel has a module of the name of one loaded here: a
    fresh interpreter would import the panel's, so it gets one."""
    loaded = {name.partition(".")[0] for name in sys.modules}
    try:
        names = os.listdir(directory)
    except OSError:
        return True
    return any(n.removesuffix(".py") in loaded for n in names if n.endswith(".py") or "." not in n)


script = args[0] if argv[0] == "python3" and args and not args[0].startswith("-") else None
home = os.path.dirname(os.path.abspath(script)) if script else None
if script and os.path.isfile(script) and not shadowed(home):
    sys.argv = args
    sys.path[0] = home
    # What `site` adds at a start, had the code been there: the user's
    # site-packages (`pip install --user` in a Studio), before the system's.
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        before = list(sys.path)
        site.addsitedir(site.getusersitepackages())
        added = [p for p in sys.path if p not in before]
        rest = [p for p in before if p not in added]
        at = next((i for i, p in enumerate(rest) if p.endswith("-packages")), len(rest))
        sys.path[:] = rest[:at] + added + rest[at:]
    runpy.run_path(script, run_name="__main__")
else:
    try:
        os.execvpe(argv[0], argv, os.environ)
    except OSError as error:
        sys.stderr.write(f"nexus-warm: {argv[0]}: {error}\n")
        sys.exit(127)
