"""A bubblewrap sandbox for InterCode-Bash: one private root per episode, one command per call.

Isolation (see `Sandbox.run`):
- the episode's root directory (a host temporary directory) is bind-mounted writable at `/`; the system
  (`/usr` and its `/bin`, `/lib` links) is mounted read-only on top, `/usr/local` is hidden, `/etc` is a
  short read-only allow-list (no `shadow`, no host secrets) with a generated `passwd`/`group`;
  `/proc` and `/dev` are private; `/root` (HOME) and `/tmp` live inside the episode root;
- new PID, network (loopback only), IPC, UTS and cgroup namespaces; `--die-with-parent`, `--new-session`;
  when the PID namespace's init ends every process left in it is killed, so no process outlives a step;
- when run as root the command drops to an unprivileged uid that is unique to the sandbox (no capabilities,
  `no_new_privs`), so RLIMIT_NPROC applies; as a normal user, bubblewrap's user namespace maps the caller;
- rlimits: CPU seconds, address space, file size, open files, process count, no core files;
  a wall-clock limit, an output cap (the rest is drained and dropped) and a disk quota on the episode root
  enforced by a watchdog that kills the command when exceeded.

Needs `bwrap` (Debian/Ubuntu package `bubblewrap`); `SandboxUnavailable` says so when it is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Top-level names that are the sandbox's own mounts or, as in upstream InterCode's .gitignore, system folders:
# they are never part of the compared file-system state.
IGNORED_TOP = frozenset(
    [
        "bin",
        "boot",
        "dev",
        "etc",
        "home",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "media",
        "opt",
        "proc",
        "root",
        "run",
        "sbin",
        "srv",
        "sys",
        "usr",
        "var",
    ]
)
MOUNT_TOP = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "opt", "proc", "dev")
ETC_ALLOW = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "nsswitch.conf",
    "localtime",
    "alternatives",
    "magic",
    "magic.mime",
    "mime.types",
    "bash.bashrc",
    "profile",
    "inputrc",
    "protocols",
    "services",
    "hosts",
    "os-release",
    "debian_version",
    "timezone",
    "environment",
    "login.defs",
    "ssl",
    "perl",
)
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: `apt-get install -y bubblewrap`; CI: .ci/services.sh)"


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 1024
    file_mb: int = 8
    disk_mb: int = 32
    nproc: int = 64
    nofile: int = 256
    output_bytes: int = 64 * 1024


@dataclass
class RunResult:
    output: str
    exit_code: int | None
    wall_s: float
    timed_out: bool = False
    truncated: bool = False
    killed: str | None = None
    """Why the command was killed: `wall-clock`, `disk-quota`, or None."""
    leftover: list[int] = field(default_factory=list)
    """Pids of sandbox processes found alive after the step (always killed; should be empty)."""


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(f"InterCode-Bash needs the `bwrap` executable: {INSTALL_HINT}")
    return path


_CHECKED: dict[str, str | None] = {}


def check_bwrap() -> None:
    """Raise SandboxUnavailable unless bubblewrap can start a sandbox on this machine (checked once)."""
    if "error" not in _CHECKED:
        try:
            box = Sandbox(limits=SandboxLimits(wall_s=10))
            try:
                res = box.run("echo ok")
            finally:
                box.close()
            _CHECKED["error"] = (
                None if res.output.strip() == "ok" else f"bubblewrap failed to run a command: {res.output[:300]}"
            )
        except SandboxUnavailable as err:
            _CHECKED["error"] = str(err)
    if _CHECKED["error"]:
        raise SandboxUnavailable(_CHECKED["error"])


def new_uid() -> int:
    """A fresh unprivileged uid for a sandbox (root mode); an environment keeps one for all its sandboxes, so
    that ownership recorded in outputs (`tar`, `ls -n`) is the same for the agent's and the gold's run."""
    return 200_000 + secrets.randbelow(800_000)


def _is_root() -> bool:
    return os.geteuid() == 0


def _uid_processes(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _tree_size(root: Path) -> int:
    total = 0
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        else:
                            total += e.stat(follow_symlinks=False).st_blocks * 512
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


class _CappedOutput:
    """Reads a process's output on a thread, keeping the first `limit` bytes: a flood cannot fill the memory,
    and the pipe never blocks the command."""

    def __init__(self, proc: subprocess.Popen[bytes], limit: int) -> None:
        self.chunks: list[bytes] = []
        self.kept, self.limit, self.truncated = 0, limit, False
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        while data := proc.stdout.read1(65536):
            room = self.limit - self.kept
            if room > 0:
                self.chunks.append(data[:room])
                self.kept += min(room, len(data))
            self.truncated |= len(data) > max(room, 0)

    def join(self) -> None:
        self.thread.join(timeout=5)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


class Sandbox:
    """A private root directory and a way to run shell commands confined to it.

    `Sandbox(limits)` makes an empty root (or a copy of `template`, a directory made by an earlier sandbox);
    `run(cmd, cwd)` runs `bash -c cmd` inside; `snapshot()` returns the compared file-system state;
    `close()` deletes everything. Usable as a context manager. Sandboxes that share a `uid` must not run
    commands at the same time (the leftover-process sweep is per uid).
    """

    def __init__(self, limits: SandboxLimits | None = None, template: Path | None = None, uid: int | None = None):
        self.bwrap = find_bwrap()
        self.limits = limits or SandboxLimits()
        self.base = Path(tempfile.mkdtemp(prefix="leap-icbash-"))
        os.chmod(self.base, 0o700)
        self.root = self.base / "root"
        self.meta = self.base / "meta"
        self.meta.mkdir()
        if template is not None:
            shutil.copytree(template, self.root, symlinks=True)
        else:
            self.root.mkdir()
        self.root_mode = _is_root()
        if self.root_mode:
            # A uid no one else uses, so that RLIMIT_NPROC and the leftover-process sweep are per sandbox.
            self.uid = self.gid = uid if uid is not None else new_uid()
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
        for sub, mode in (("tmp", 0o1777), ("root", 0o700)):
            (self.root / sub).mkdir(exist_ok=True)
            os.chmod(self.root / sub, mode)
        if self.root_mode:
            chown_tree(self.root, self.uid, self.gid)
        (self.meta / "passwd").write_text(
            f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\nuser:x:{self.uid}:{self.gid}:user:/root:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
        (self.meta / "group").write_text(f"root:x:0:\nuser:x:{self.gid}:\nnogroup:x:65534:\n")
        compat = self.meta / "bin"
        compat.mkdir()
        if Path("/usr/bin/rename.ul").exists() and not Path("/usr/bin/rename").exists():
            # upstream's Alpine `rename` has util-linux syntax (`rename .txt .md files`)
            os.symlink("/usr/bin/rename.ul", compat / "rename")
        self.closed = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.root_mode:
                self._kill_leftovers()
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- running ---------------------------------------------------------------------------------------------
    def _argv(self, script: str) -> list[str]:
        a = [self.bwrap, "--bind", str(self.root), "/", "--ro-bind", "/usr", "/usr", "--tmpfs", "/usr/local"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            p = Path("/" + name)
            if p.is_symlink():
                a += ["--symlink", os.readlink(p), "/" + name]
            elif p.is_dir():
                a += ["--ro-bind", str(p), "/" + name]
        for name in ETC_ALLOW:
            if Path("/etc", name).exists():
                a += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
        a += ["--ro-bind", str(self.meta / "passwd"), "/etc/passwd"]
        a += ["--ro-bind", str(self.meta / "group"), "/etc/group"]
        a += ["--ro-bind", str(self.meta / "bin"), "/opt/leapbox/bin"]
        a += ["--proc", "/proc", "--dev", "/dev"]
        a += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not self.root_mode:
            a += ["--unshare-user"]
        a += ["--die-with-parent", "--new-session", "--hostname", "sandbox", "--chdir", "/"]
        a += ["--clearenv"]
        env = {
            "PATH": "/opt/leapbox/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": "/root",
            "USER": "user",
            "LOGNAME": "user",
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "SHELL": "/bin/bash",
            "PWD": "/",
        }
        for k, v in env.items():
            a += ["--setenv", k, v]
        a += ["--"]
        if self.root_mode:
            a += [
                "/usr/bin/setpriv",
                f"--reuid={self.uid}",
                f"--regid={self.gid}",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
            ]
        a += ["/bin/bash", "-c", script]
        return a

    def _preexec(self) -> None:
        lim = self.limits
        mem = lim.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        fsize = lim.file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim.nofile, lim.nofile))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        nproc = lim.nproc
        if not self.root_mode:  # the count is per real uid, so leave room for the caller's own processes
            nproc += len(_uid_processes(os.getuid()))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    def _prepare_root(self) -> None:
        """Remove the previous step's mount points so that bwrap (root) never resolves a path the sandboxed
        user could have replaced by a symlink; make sure /tmp and /root are real directories."""
        for name in MOUNT_TOP:
            p = self.root / name
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.exists():
                shutil.rmtree(p, ignore_errors=True)
        for sub, mode in (("tmp", 0o1777), ("root", 0o700)):
            p = self.root / sub
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                p.unlink()
            if not p.exists():
                p.mkdir()
                if self.root_mode:
                    os.chown(p, self.uid, self.gid)
            os.chmod(p, mode)
        for sub in ("etc", "opt/leapbox/bin", "usr", "proc", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("etc", "opt", "opt/leapbox", "opt/leapbox/bin", "usr", "proc", "dev"):
            os.chmod(self.root / sub, 0o755)

    def run(self, command: str, cwd: str = "/") -> RunResult:
        """Run `bash -c command` with `cwd` as working directory (falls back to `/` if it does not exist)."""
        if self.closed:
            raise RuntimeError("sandbox is closed")
        self._prepare_root()
        script = f"cd -- {_shquote(cwd)} 2>/dev/null || cd /\n{command}"
        start = time.monotonic()
        proc = subprocess.Popen(
            self._argv(script),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self._preexec,  # noqa: PLW1509 - rlimits must be set between fork and exec
        )
        output = _CappedOutput(proc, self.limits.output_bytes)
        killed = self._supervise(proc, start)
        output.join()
        leftover: list[int] = []
        if self.root_mode:
            # the PID namespace dies with its init; give the kernel a moment before sweeping
            deadline = time.monotonic() + 1.0
            while _uid_processes(self.uid) and time.monotonic() < deadline:
                time.sleep(0.02)
            leftover = self._kill_leftovers()
        if killed == "disk-quota" or _tree_size(self.root) > self.limits.disk_mb * 1024 * 1024:
            killed = killed or "disk-quota"
            self._enforce_quota()
        return RunResult(
            output=output.text() + self._why_stopped(proc.returncode, killed),
            exit_code=proc.returncode,
            wall_s=round(time.monotonic() - start, 3),
            timed_out=killed == "wall-clock",
            truncated=output.truncated,
            killed=killed,
            leftover=leftover,
        )

    def _supervise(self, proc: subprocess.Popen[bytes], start: float) -> str | None:
        """Wait for `proc`, killing its process group past the wall-clock limit or the disk quota; says which."""
        last_disk, quota = 0.0, self.limits.disk_mb * 1024 * 1024
        while True:
            try:
                proc.wait(timeout=0.05)
                return None
            except subprocess.TimeoutExpired:
                pass
            now, killed = time.monotonic(), None
            if now - start > self.limits.wall_s:
                killed = "wall-clock"
            elif now - last_disk > 0.2:
                last_disk = now
                killed = "disk-quota" if _tree_size(self.root) > quota else None
            if killed:
                _killpg(proc.pid)
                proc.wait()
                return killed

    def _why_stopped(self, code: int | None, killed: str | None) -> str:
        """A note for the output when a limit stopped the command: the agent sees why it got no answer."""
        if killed == "wall-clock":
            return f"\n[sandbox: command timed out after {self.limits.wall_s:g}s]"
        if killed == "disk-quota":
            return f"\n[sandbox: disk quota of {self.limits.disk_mb} MB exceeded; largest new files removed]"
        if code is not None and code > 128:
            with contextlib.suppress(ValueError):
                sig = signal.Signals(code - 128)
                if sig == signal.SIGXFSZ:
                    return "\n[sandbox: file size limit exceeded]"
                if sig == signal.SIGXCPU:
                    return "\n[sandbox: CPU time limit exceeded]"
        return ""

    def _kill_leftovers(self) -> list[int]:
        found: list[int] = []
        for _ in range(20):
            pids = _uid_processes(self.uid)
            if not pids:
                break
            found.extend(p for p in pids if p not in found)
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        return found

    def _enforce_quota(self) -> None:
        """Delete the largest files until the root is back under its quota."""
        quota = self.limits.disk_mb * 1024 * 1024
        files = []
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                p = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    files.append((os.lstat(p).st_blocks * 512, p))
        files.sort(reverse=True)
        total = sum(s for s, _ in files)
        for size, p in files:
            if total <= quota:
                break
            with contextlib.suppress(OSError):
                os.unlink(p)
                total -= size

    # -- state -----------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, str]:
        """The compared state: every regular file and symlink outside the ignored system folders.

        As upstream's `git status` it ignores directories themselves (git does not track empty ones); a file's
        state is its md5 and executable bit, a link's is its target.
        """
        return snapshot_tree(self.root)


def snapshot_tree(root: Path) -> dict[str, str]:
    state: dict[str, str] = {}
    root_s = str(root)
    for dirpath, dirnames, filenames in os.walk(root_s):
        rel_dir = os.path.relpath(dirpath, root_s)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in IGNORED_TOP]
            filenames = [f for f in filenames if f not in IGNORED_TOP]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.normpath(os.path.join(rel_dir, name))
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if os.path.islink(full):
                state[rel] = "link:" + os.readlink(full)
            elif name in filenames and os.path.isfile(full):
                h = hashlib.md5()
                try:
                    with open(full, "rb") as fh:
                        for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                            h.update(block)
                except OSError:
                    continue
                state[rel] = f"{h.hexdigest()}:{'x' if st.st_mode & 0o111 else '-'}"
    return state


def _killpg(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _shquote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"
