# The first process of a warm sandbox (see warm.rs). It starts as root (the
# gVisor sandbox's, with only the capabilities to change uid; or, for
# `--sandbox process`, the host's, in the instance's namespace and cgroup),
# loads what Python web panels load, says so on stderr and waits on stdin
# for its one job: {"uid": N, "cwd": "...", "env": [[k, v], ...], "argv": [...]}.
# It then becomes that uid for good and runs argv in cwd: a
# `python3 script.py ...` in this very interpreter, its imports already
# done; anything else by exec. It never runs a second job.
import sys

# Nothing is ever imported from the working directory (`-c` puts it first):
# the panel's code lands there while this is still root.
sys.path[:] = [p for p in sys.path if p]

import ctypes  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import signal  # noqa: E402
import site  # noqa: E402

# Loaded ahead for the panel: what a standard-library web panel imports.
import hmac  # noqa: E402,F401
import http.client  # noqa: E402,F401
import http.server  # noqa: E402,F401
import socketserver  # noqa: E402,F401
import threading  # noqa: E402,F401
import traceback  # noqa: E402,F401
import urllib.error  # noqa: E402,F401
import urllib.parse  # noqa: E402,F401
import urllib.request  # noqa: E402,F401

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
CAP_SETPCAP = 8
SIGKILL = 9
# Its parent now: the driver (or, in gVisor, nobody: 0).
PARENT = os.getppid()

sys.stderr.write("nexus-warm: ready\n")
line = sys.stdin.readline()
try:
    job = json.loads(line)
    uid, cwd, env = int(job["uid"]), str(job["cwd"]), dict(job["env"])
    argv = [str(a) for a in job["argv"]]
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
# Every capability out of the bounding set (CAP_SETPCAP, which allows it,
# last): nothing it runs can take one back.
libc = ctypes.CDLL(None, use_errno=True)
try:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
except (OSError, ValueError):
    last = 40
for cap in [c for c in range(last + 1) if c != CAP_SETPCAP] + [CAP_SETPCAP]:
    if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
        sys.stderr.write(f"nexus-warm: could not drop capability {cap}\n")
        sys.exit(71)
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
# What a cold start's process gets (procs.rs's prepare): no new privileges,
# and killed with its parent (a uid change clears that).
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0:
    sys.stderr.write("nexus-warm: could not set no_new_privs or the parent-death signal\n")
    sys.exit(72)
if os.getppid() != PARENT:
    sys.exit(73)
# The uid change made it undumpable, root's /proc entries; a panel started
# cold as this uid owns its own.
libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
# As the panel: the code is its own, 0700, and root may not pass here.
os.chdir(cwd)


def shadowed(directory):
    """Whether the panel has a module of the name of one loaded here: a
    fresh interpreter would import the panel's, so it gets one."""
    loaded = {name.partition(".")[0] for name in sys.modules}
    try:
        names = os.listdir(directory)
    except OSError:
        return True
    for name in names:
        module = name.endswith((".py", ".pyc", ".so")) or os.path.isdir(os.path.join(directory, name))
        if module and name.partition(".")[0] in loaded:
            return True
    return False


# `python3` resolves as the zygote's own name did: this interpreter is the
# one the command asks for. `-u` changes nothing here: PYTHONUNBUFFERED is
# in every panel's environment (start.rs's base_env) and in this one's.
args = argv[1:]
if argv[0] == "python3" and args[:1] == ["-u"]:
    args = args[1:]
script = args[0] if argv[0] == "python3" and args and not args[0].startswith("-") else None
home = os.path.dirname(os.path.realpath(script)) if script else None
if script and os.path.isfile(script) and not shadowed(home):
    sys.argv = args
    sys.path.insert(0, home)
    # What `site` adds at a start, had the code been there: the user's
    # site-packages (`pip install --user` in a Studio), before the system's.
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        before = list(sys.path)
        site.addsitedir(site.getusersitepackages())
        added = [p for p in sys.path if p not in before]
        rest = [p for p in before if p not in added]
        at = next((i for i, p in enumerate(rest) if p.endswith("-packages")), len(rest))
        sys.path[:] = rest[:at] + added + rest[at:]
    importlib.invalidate_caches()
    runpy.run_path(os.path.abspath(script), run_name="__main__")
else:
    # Python ignores these two; what it execs must start as it would.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    try:
        os.execvpe(argv[0], argv, os.environ)
    except OSError as error:
        sys.stderr.write(f"nexus-warm: {argv[0]}: {error}\n")
        sys.exit(127)
