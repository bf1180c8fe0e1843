"""One writer at a time: the lock every command that writes a run directory (or an artifact, or a data file)
holds while it writes.

`RunLock(path, command)` is a file beside what is written, `<parent>/.<name>.lock` (`layout.lock_path`): beside,
not inside, so it survives a directory being replaced whole (`layout.replace_dir`) and never travels with a copy
of the run. It is created atomically (O_CREAT | O_EXCL: of two writers exactly one creates it) and holds who
holds it: pid, host, boot id, PID namespace, start time, the command and a random token. It is removed when the
`with` block ends, by a normal exit or an exception; only a kill can leave it behind, and then the next writer
finds it stale:

- the same PID namespace of the same boot of the same host (hostname, /proc/sys/kernel/random/boot_id and the
  inode of /proc/self/ns/pid all equal), and the pid is not running (or is a zombie, or a different process that
  reused the pid: its start time in /proc differs): stale. It is taken over with a message; the takeover itself
  is serialised by the guard below, so two newcomers never both take it.
- another host, another boot, or another PID namespace (containers sharing a hostname and a volume but not
  their processes): its pid cannot be checked from here. Refused, with the command that removes it.
- a live holder: refused (LockError, one line, the CLI exits 2).

Every change to an existing lock file (a takeover's removal, an adoption's rewrite, a release's removal) is a
compare-and-change made under a guard, an flock on `<lock>.takeover`: it re-reads the lock and changes it only if
it still holds what was judged. The kernel drops an flock when its holder dies, however it dies, so a writer
killed inside the guard blocks no one; a live holder that keeps it (stopped) is named after GUARD_WAIT seconds.

`dspark train` takes the lock in the launching process and passes its token to the trainer it starts
(`DSPARK_LOCK_TOKEN`, `run_holding_lock`); the trainer's main process adopts it (rewrites it with its own pid, so a
kill of the launcher alone does not make a running trainer's lock look stale). A release removes the lock only if
it holds our token and names our pid or a process that has ended: the launcher never frees a lock its trainer
still holds.

No trainer outlives its launcher (`run_tied`, `tie_to_launcher`): the launcher's child (the trainer, or
accelerate's agent) runs in a session of its own and the kernel SIGKILLs it when the launcher dies (Linux
PR_SET_PDEATHSIG); each accelerate rank, which torch's agent starts in a session of its own, ties itself to the
agent the same way at its start. So a kill of the launcher alone, even `kill -9` of its process group, ends the
whole run, and the rerun takes the dead trainer's lock over and resumes from its last checkpoint. An interrupted
launcher (Ctrl-C, SIGTERM, SIGHUP) sends SIGINT to its child's process group and to every rank's, and releases
only once none of them is left. Off Linux no child is tied: a launcher killed there leaves its trainer running.

Long because the lock and the lifetime of the processes that hold it (a launcher, the trainer and ranks it ties
to itself) are one protocol: a trainer that outlives its launcher is a writer the lock cannot see.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

from .config import RecipeError
from .layout import lock_path, write_atomic

TOKEN_ENV = "DSPARK_LOCK_TOKEN"  # a launcher's lock token, adopted by the process it starts
LAUNCHER_ENV = "DSPARK_LAUNCHER"  # the launcher's pid and namespace (JSON): a trainer it started dies with it
GUARD_WAIT = 60.0  # seconds to wait for another writer's takeover guard (held for microseconds unless stopped)


class LockError(RecipeError):
    """Another process holds the lock: the one-line message names it and how to proceed (CLI: exit 2)."""


def _stat(pid: int) -> Optional[list[str]]:
    """/proc/<pid>/stat after the command name: [state, ppid, pgrp, ...], start time at [19]; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _proc_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot; None where unknown."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def _namespace() -> dict:
    """What makes a pid checkable from here: the host, this boot of it, and our PID namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = None
    try:
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": boot, "pid_ns": pid_ns}


def _alive(pid: int, proc_start: Optional[int]) -> bool:
    """Whether `pid` on this host is still the process that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    fields = _stat(pid)
    if fields and fields[0] == "Z":  # killed, not yet reaped: it writes nothing any more
        return False
    return proc_start is None or fields is None or int(fields[19]) == proc_start


class RunLock:
    """`with RunLock(path, "dspark train"):` (see the module docstring). `adopt`: a launcher's token, taken
    over as ours when the lock holds it."""

    def __init__(self, path: Union[str, Path], command: str, adopt: Optional[str] = None, wait: float = 0.0):
        self.target = Path(path).expanduser().resolve()
        self.path = lock_path(self.target)
        self.command = command
        self.adopt = adopt
        self.wait = wait  # seconds to wait for a live holder before refusing (0: refuse at once)
        self.token: Optional[str] = None

    # ------------------------------------------------------------------ the record
    def _record(self) -> dict:
        return {"pid": os.getpid(), **_namespace(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "proc_start": _proc_start(os.getpid()), "command": self.command, "token": self.token}

    @staticmethod
    def _elsewhere(rec: dict) -> Optional[str]:
        """Why the holder's pid cannot be checked from here (None: it can). Keys a lock lacks (written before they
        were recorded) are not compared."""
        here = _namespace()
        if rec.get("host") != here["host"]:
            return "another host"
        if rec.get("boot_id") is not None and rec["boot_id"] != here["boot_id"]:
            return "another boot of this host (or another machine of the same name)"
        if rec.get("pid_ns") is not None and rec["pid_ns"] != here["pid_ns"]:
            return "another PID namespace (a container) on this host"
        return None

    def _read(self) -> Optional[dict]:
        """The holder's record; None when the file is gone. A file torn or emptied (a kill between create and
        write) reads as {} and counts as stale once it is older than a few seconds."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(text)
            return rec if isinstance(rec, dict) else {}
        except json.JSONDecodeError:
            return {}

    def _describe(self, rec: dict) -> str:
        return (f"{rec.get('command', 'a dspark command')} (pid {rec.get('pid', '?')} on {rec.get('host', '?')}, "
                f"started {rec.get('started', '?')})")

    def _stale(self, rec: dict) -> bool:
        if not rec:  # torn: its writer died between creating and filling it
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        if self._elsewhere(rec):
            return False
        return not isinstance(rec.get("pid"), int) or not _alive(rec["pid"], rec.get("proc_start"))

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.adopt:
            with self._guard():
                if (self._read() or {}).get("token") == self.adopt:
                    self.token = self.adopt
                    write_atomic(self.path, json.dumps(self._record()))  # ours now: our pid, the launcher's token
                    return self
        self.token = secrets.token_hex(8)
        deadline, takeovers, waiting = time.monotonic() + self.wait, 0, False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                rec = self._read()
                if rec is None:  # released in between: try again
                    continue
                if self._stale(rec):
                    takeovers += 1
                    if takeovers > 20:
                        raise LockError(f"{self.path}: could not take the lock (it keeps changing hands); "
                                        "try again") from None
                    self._take_over(rec)
                    continue
                if time.monotonic() >= deadline:
                    raise LockError(self._refusal(rec)) from None
                if not waiting:
                    print(f"note: {self.target}: waiting for {self._describe(rec)}", file=sys.stderr, flush=True)
                    waiting = True
                time.sleep(0.5)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self._record()))
            return self

    def _refusal(self, rec: dict) -> str:
        what = f"{self.target}: {self._describe(rec)} is writing it"
        where = self._elsewhere(rec) if rec.get("host") is not None else None
        if where:
            what += "" if where == "another host" else f" from {where}"
            return (f"{what}; this host ({socket.gethostname()}) cannot check that process: if it has ended, "
                    f"remove the lock with `rm {self.path}` and run again")
        return f"{what}; wait for it to finish or stop it (kill {rec.get('pid')}), then run again"

    @contextlib.contextmanager
    def _guard(self):
        """Hold the takeover guard (see the module docstring). Its holder removes the guard file before letting go,
        so a waiter that then gets the flock of a removed file opens the path again."""
        guard = self.path.with_name(self.path.name + ".takeover")
        deadline = time.monotonic() + GUARD_WAIT
        while True:
            fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    try:
                        holder = f"pid {int(guard.read_text())}"
                    except (OSError, ValueError):
                        holder = "another process"
                    raise LockError(f"{guard}: held by {holder} for {GUARD_WAIT:g} s (stopped?); resume or end it, "
                                    "then run again") from None
                time.sleep(0.01)
                continue
            except OSError as e:
                os.close(fd)
                raise LockError(f"{guard}: this filesystem refuses file locks ({e.strerror}); the run lock needs "
                                "them") from None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(guard)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())  # for the message of a writer that waits too long
            yield
        finally:
            guard.unlink()
            os.close(fd)

    def _take_over(self, stale: dict) -> None:
        """Remove the stale lock `stale`, unless someone else replaced it meanwhile."""
        with self._guard():
            if self._read() == stale:
                self.path.unlink(missing_ok=True)  # missing: removed by hand
                who = self._describe(stale) if stale else "a lock left half-written"
                print(f"note: {self.target}: taking over a stale lock of {who}, which is no longer running",
                      file=sys.stderr, flush=True)

    def release(self) -> None:
        """Remove the lock if it is still ours (by token) and no live process holds it for us: a trainer that
        adopted a launcher's token keeps it until it ends itself. Never someone else's."""
        if self.token is None:
            return
        with self._guard():
            rec = self._read() or {}
            if rec.get("token") == self.token:
                pid = rec.get("pid")
                if pid == os.getpid() or not isinstance(pid, int) or not _alive(pid, rec.get("proc_start")):
                    self.path.unlink(missing_ok=True)
        self.token = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_holding_lock(cmd: list[str], env: dict, path: Union[str, Path], command: str) -> int:
    """Run `cmd` (a trainer launch) holding the lock of `path`, handed to it through TOKEN_ENV; returns its exit
    code. The child is tied to this launcher (`run_tied`): interrupted, the launcher stops it and every rank and
    releases the lock only once they are gone; killed, it takes them all with it."""
    with RunLock(path, command) as lock:  # refused before launching
        return run_tied(cmd, {**env, TOKEN_ENV: lock.token}, what="the trainer")


# --------------------------------------------------------------------------- children that die with their parent
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@functools.lru_cache(maxsize=None)
def _prctl():
    """libc's prctl on Linux; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent ends (PR_SET_PDEATHSIG: kept across exec, not given to
    children). False where that is not available. The caller checks that its parent had not already ended."""
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0),
                                       ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


def _tie_to(parent: int) -> Callable[[], None]:
    """A child's preexec_fn: die with `parent`, at once if it already ended between the fork and the tie."""
    _prctl()  # resolved before the fork

    def tie() -> None:
        if die_with_parent() and os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return tie


def _ancestors(pid: int) -> list[int]:
    out = []
    while (fields := _stat(pid)) is not None and int(fields[1]) > 0:
        pid = int(fields[1])
        out.append(pid)
    return out


def tie_to_launcher() -> None:
    """A trainer's first act (dspark_train/train.py): die with its parent when `dspark train` started it, directly
    (its parent is the launcher, which already tied it) or as a rank of accelerate's agent (its parent is the
    agent, tied to the launcher; torch starts ranks in sessions of their own, out of reach of any group signal).
    A trainer whose launcher had already ended before the tie stops here (tied first, checked after: no gap).
    Nothing to do without a launcher, on another machine than the launcher's (a multi-node launch copies the
    environment), under a live launcher that is not an ancestor (ranks started through ssh), or off Linux."""
    try:
        launcher = json.loads(os.environ.get(LAUNCHER_ENV) or "null")
    except ValueError:
        return
    if not isinstance(launcher, dict) or RunLock._elsewhere(launcher) or not die_with_parent():
        return
    pid = launcher.get("pid")
    if pid not in _ancestors(os.getpid()) and not (isinstance(pid, int) and _alive(pid, launcher.get("proc_start"))):
        raise SystemExit(f"error: dspark train (pid {pid}), which started this trainer, has ended")


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as Ctrl-C raises KeyboardInterrupt; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_signals():
    """Within the block SIGTERM and SIGHUP raise Stopped, as SIGINT raises KeyboardInterrupt: a process stopped
    that way unwinds (its locks, its children) instead of vanishing. A signal this process ignores (nohup's
    SIGHUP) stays ignored."""
    def stopped(signum, frame):
        raise Stopped(signum)
    previous = {s: signal.signal(s, stopped) for s in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_tied(cmd: list[str], env: Optional[dict] = None, cwd: Union[str, Path, None] = None,
             what: str = "the child") -> int:
    """Run `cmd` as a child that cannot outlive this process; returns its exit code. It runs in a session of its
    own (a terminal's Ctrl-C reaches us only, and we pass it on once), the kernel kills it if we die, however we
    die (`die_with_parent`; it learns our pid through LAUNCHER_ENV, for its own children to check), and when we are
    stopped (Ctrl-C, SIGTERM, SIGHUP) we stop it and the processes it started, and re-raise only once they are
    all gone."""
    me = {"pid": os.getpid(), "proc_start": _proc_start(os.getpid()), **_namespace()}
    env = {**(os.environ if env is None else env), LAUNCHER_ENV: json.dumps(me)}
    with stop_signals():
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, preexec_fn=_tie_to(os.getpid()))
        try:
            return proc.wait()
        except KeyboardInterrupt:
            _stop(proc, what)
            raise


def _processes() -> dict[int, tuple[str, int, int]]:
    """pid → (state, ppid, process group) of every process here; empty without /proc."""
    out = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if name.isdigit() and (fields := _stat(int(name))) is not None:
            out[int(name)] = (fields[0], int(fields[1]), int(fields[2]))
    return out


def _descendant_groups(root: int, procs: dict) -> set[int]:
    """The process groups of `root`'s descendants: an accelerate agent starts each rank in a session of its own."""
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    groups, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            groups.add(procs[child][2])
            todo.append(child)
    return groups - {os.getpgrp()}


def _live_groups(groups: set[int], procs: dict) -> set[int]:
    """Which of `groups` still hold a process that is not a zombie: a rank orphaned to an init that never reaps
    (some containers) would otherwise keep its group "alive" for ever, and Ctrl-C would never return."""
    if procs:
        return {pgrp for state, _, pgrp in procs.values() if pgrp in groups and state != "Z"}
    live = set()
    for group in groups:  # no /proc: whether any member, zombie or not, is left
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        live.add(group)
    return live


def _stop(proc: subprocess.Popen, what: str) -> None:
    """SIGINT to the child's process group and to those of every process it started (SIGTERM after 60 s, SIGKILL
    after 120 s, at once on a second interrupt); returns when none of them has a live process left."""
    print(f"\ninterrupted: stopping {what} (process group {proc.pid}) and waiting for it", file=sys.stderr,
          flush=True)
    start, groups, sent = time.monotonic(), {proc.pid}, {}
    while True:
        procs = _processes()
        groups |= _descendant_groups(proc.pid, procs)
        live = _live_groups(groups, procs)
        if not live:
            break
        elapsed = time.monotonic() - start
        sig = signal.SIGINT if elapsed < 60 else signal.SIGTERM if elapsed < 120 else signal.SIGKILL
        for group in live:
            if sent.get(group) != sig:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, sig)
                sent[group] = sig
        try:
            proc.wait(timeout=0.2)  # reap the leader; its group and the ranks may live on a little longer
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM): escalate at once
            start -= 120
    proc.wait()


class _NoLock:
    token = None

    def __enter__(self) -> "_NoLock":
        return self

    def __exit__(self, *exc) -> None:
        return None


def holds_lock(where: Callable[..., Union[str, Path]], command: str, main_process_only: bool = False):
    """Decorator for a command's library entry point: each call holds `RunLock(where(*args, **kwargs))` (the
    path it writes) from before its first line to after its last. `main_process_only`: for code every rank of
    a distributed launch runs; the global rank 0 holds the lock (adopting its launcher's, see the module
    docstring), the other ranks write nothing and hold nothing."""
    def decorate(fn):
        @functools.wraps(fn)
        def locked(*args, **kwargs):
            path = where(*args, **kwargs)
            if main_process_only and int(os.environ.get("RANK", "0")) != 0:
                lock = _NoLock()
            else:
                lock = RunLock(path, command, adopt=os.environ.get(TOKEN_ENV) if main_process_only else None)
            with lock:
                return fn(*args, **kwargs)
        return locked
    return decorate
