"""One writer per run directory ([M] case 6): the lock file, its refusals, its stale takeover, every writing
command holding it, and two real trainers on one run directory."""
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dspark_train.cli import main as cli_main
from dspark_train.layout import lock_path
from dspark_train.runlock import LAUNCHER_ENV, TOKEN_ENV, LockError, RunLock, _namespace, _proc_start

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false"}


def _record(path: Path) -> dict:
    return json.loads(lock_path(path).read_text())


def _dead_lock(run: Path, command: str = "dspark train") -> int:
    """A lock left by a process that was SIGKILLed while holding it; returns that process's pid."""
    code = (f"import os, signal; from dspark_train.runlock import RunLock; RunLock({str(run)!r}, {command!r})"
            ".acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV)
    assert proc.returncode == -signal.SIGKILL and lock_path(run).is_file()
    return _record(run)["pid"]


# --------------------------------------------------------------------------- the lock
def test_lock_records_its_holder_and_is_released_on_exit(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, "dspark train") as lock:
        rec = _record(run)
        assert lock_path(run) == tmp_path / ".run.lock"
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["token"] == lock.token
        assert rec["command"] == "dspark train" and rec["started"] and rec["proc_start"] is not None
    assert not lock_path(run).exists()


def test_lock_is_released_when_the_writer_raises(tmp_path):
    with pytest.raises(RuntimeError), RunLock(tmp_path / "run", "dspark calibrate"):
        raise RuntimeError("boom")
    assert not lock_path(tmp_path / "run").exists()
    with RunLock(tmp_path / "run", "dspark calibrate"):  # and can be taken again at once
        pass


def test_second_writer_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunLock(run, "dspark train"):
        with pytest.raises(LockError, match=rf"{run}: dspark train \(pid {os.getpid()} on {socket.gethostname()}, "
                                            rf"started .*\) is writing it; wait for it .* \(kill {os.getpid()}\)"):
            RunLock(run, "dspark calibrate").acquire()
        assert _record(run)["command"] == "dspark train"  # the refused one took nothing


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path, capsys):
    run = tmp_path / "run"
    dead = _dead_lock(run)
    with RunLock(run, "dspark train"):
        assert _record(run)["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"{run}: taking over a stale lock of dspark train (pid {dead} on {socket.gethostname()}" in err
    assert not lock_path(run).exists()


def test_reused_pid_counts_as_stale(tmp_path, capsys):
    run = tmp_path / "run"
    lock_path(run).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "proc_start": 1,
                                          "command": "dspark data", "token": "x", "started": "then"}))
    with RunLock(run, "dspark train"):  # our own pid, but not the process that started at tick 1
        pass
    assert "taking over a stale lock of dspark data" in capsys.readouterr().err


def test_lock_from_another_host_refused_with_how_to_remove_it(tmp_path):
    run = tmp_path / "run"
    lock_path(run).write_text(json.dumps({"pid": 1, "host": "gpu-node-7", "command": "dspark train",
                                          "token": "x", "started": "then"}))
    with pytest.raises(LockError, match=rf"on gpu-node-7, .* cannot check that process: if it has ended, "
                                        rf"remove the lock with `rm {lock_path(run)}`"):
        RunLock(run, "dspark train").acquire()


@pytest.mark.parametrize("field,where", [("pid_ns", "another PID namespace"), ("boot_id", "another boot")])
def test_lock_from_another_pid_namespace_or_boot_is_refused_not_taken_over(tmp_path, field, where):
    """[S] item 4: containers sharing a hostname and a volume but not a PID namespace cannot see each other's
    processes, so a live holder there would look dead from here: such a lock is refused, never taken over."""
    from dspark_train.runlock import _namespace
    run = tmp_path / "run"
    dead = _dead_lock(run)  # a pid that is not running here
    rec = {**_record(run), field: "elsewhere"}
    assert rec["pid"] == dead and rec["host"] == socket.gethostname()
    assert rec["boot_id"] == _namespace()["boot_id"] and rec["pid_ns"] == _namespace()["pid_ns"] or field in rec
    lock_path(run).write_text(json.dumps(rec))
    with pytest.raises(LockError, match=rf"is writing it from {where}.*cannot check that process: if it has ended, "
                                        rf"remove the lock with `rm {lock_path(run)}`"):
        RunLock(run, "dspark train").acquire()
    assert _record(run) == rec


def test_a_launcher_never_releases_a_lock_its_live_trainer_holds(tmp_path):
    """[S] item 4: after the trainer adopts the token, the launcher's release leaves the lock to the trainer."""
    run = tmp_path / "run"
    code = ("import sys, time; from dspark_train.runlock import holds_lock\n"
            f"@holds_lock(lambda: {str(run)!r}, 'dspark train', main_process_only=True)\n"
            "def body():\n    print('adopted', flush=True); time.sleep(30)\n"
            "body()\n")
    lock = RunLock(run, "dspark train").acquire()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**ENV, TOKEN_ENV: lock.token},
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "adopted"
        lock.release()
        assert _record(run)["pid"] == child.pid  # still the trainer's
    finally:
        child.kill()
        child.wait()
    RunLock(run, "dspark train").acquire().release()  # the dead trainer's lock is stale: taken over


def test_an_interrupted_launcher_stops_every_rank_before_releasing(tmp_path):
    """[S] item 4: Ctrl-C on `dspark train` reaches the trainer (here one that needs a moment to finish its
    checkpoint) and every rank, though a rank runs in a session of its own as torch's agent starts it ([S2] 5);
    the lock outlives them, never the other way round."""
    run = tmp_path / "run"
    marks = tmp_path / "marks"
    trainer = ("import os, signal, subprocess, sys, time; from dspark_train.runlock import holds_lock\n"
               f"marks = {str(marks)!r}\n"
               "def stop(*_):\n    time.sleep(1.5)\n    open(marks, 'a').write('rank0 done\\n')\n    sys.exit(0)\n"
               "signal.signal(signal.SIGINT, stop)\n"
               "rank1 = subprocess.Popen([sys.executable, '-c', 'import signal, sys, time\\n"
               "def stop(*_):\\n    time.sleep(2.5)\\n    open(%r, \\'a\\').write(\\'rank1 done\\\\n\\')\\n"
               "    sys.exit(0)\\nsignal.signal(signal.SIGINT, stop)\\n"
               "open(%r, \\'a\\').write(\\'rank1 ready\\\\n\\')\\ntime.sleep(60)' % (marks, marks)],\n"
               "                         start_new_session=True)\n"
               f"@holds_lock(lambda: {str(run)!r}, 'dspark train', main_process_only=True)\n"
               "def body():\n    open(marks, 'a').write('adopted\\n')\n    time.sleep(60)\n"
               "body()\n")
    launcher = ("import sys; from dspark_train.runlock import run_holding_lock\n"
                f"sys.exit(run_holding_lock([sys.executable, '-c', {trainer!r}], dict(__import__('os').environ), "
                f"{str(run)!r}, 'dspark train'))\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (marks.is_file() and {"adopted", "rank1 ready"} <= set(marks.read_text().splitlines())):
        assert proc.poll() is None and time.time() < deadline  # rank 1 writes "ready" once its handler is in place
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.8)
    assert lock_path(run).is_file(), "lock released while the trainer was still writing"
    proc.wait(30)
    assert [m for m in marks.read_text().splitlines() if m != "rank1 ready"] == ["adopted", "rank0 done", "rank1 done"]
    assert not lock_path(run).exists()
    assert "stopping the trainer" in proc.stderr.read()


def _contend(run, barrier, results):
    barrier.wait()
    try:
        with RunLock(run, "dspark train"):
            results.put("won")
            time.sleep(1.0)  # held while the others try
    except LockError:
        results.put("refused")


def test_of_many_processes_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    run = tmp_path / "run"
    _dead_lock(run)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(run, barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["refused"] * 5 + ["won"]
    assert not lock_path(run).exists()


def _before_unlinking(monkeypatch, lock: Path, meanwhile) -> list:
    """Run `meanwhile()` once, in this thread, just before this thread removes `lock`: the interleaving a race
    needs, made certain. Returns a list that holds True once it ran."""
    fired, real, me = [], Path.unlink, threading.get_ident()

    def unlink(self, *args, **kwargs):
        if self == lock and not fired and threading.get_ident() == me:
            fired.append(True)
            meanwhile()
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "unlink", unlink)
    return fired


def _meanwhile_in_a_thread(fn) -> tuple[threading.Thread, callable]:
    """A thread running `fn`, and the `meanwhile` that starts it and gives it a second to finish (it cannot
    while the guard that should hold it off is held)."""
    thread = threading.Thread(target=fn)
    return thread, lambda: (thread.start(), thread.join(1.0))


def _ended_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_release_never_removes_the_lock_of_a_newcomer_taking_over(tmp_path, monkeypatch):
    """[S2] 5: the launcher releases the lock its trainer adopted and died with, while a newcomer takes that stale
    lock over and writes its own: the newcomer's lock survives the release (a release that read, then unlinked,
    removed it, and a third writer could start beside the newcomer)."""
    run = tmp_path / "run"
    launcher = RunLock(run, "dspark train").acquire()
    lock_path(run).write_text(json.dumps({**_record(run), "pid": _ended_pid()}))  # adopted, then killed
    newcomer = RunLock(run, "dspark calibrate")
    thread, meanwhile = _meanwhile_in_a_thread(newcomer.acquire)
    fired = _before_unlinking(monkeypatch, lock_path(run), meanwhile)
    launcher.release()
    thread.join(30)
    assert fired and not thread.is_alive() and newcomer.token
    assert _record(run)["token"] == newcomer.token


def test_an_adoption_racing_a_stale_takeover_leaves_one_holder(tmp_path, monkeypatch):
    """[S2] 5: the launcher died before its trainer adopted the lock, and a newcomer takes the stale lock over
    while the trainer adopts it: exactly one of the two holds it after (an adoption outside the takeover guard
    was unlinked by the takeover, and both wrote the run)."""
    run = tmp_path / "run"
    _dead_lock(run)
    trainer = RunLock(run, "dspark train", adopt=_record(run)["token"])
    newcomer = RunLock(run, "dspark calibrate")
    held = []

    def take(lock):
        try:
            lock.acquire()
            held.append(lock)
        except LockError:
            pass
    thread, meanwhile = _meanwhile_in_a_thread(lambda: take(trainer))
    fired = _before_unlinking(monkeypatch, lock_path(run), meanwhile)
    take(newcomer)
    thread.join(30)
    assert fired and not thread.is_alive()
    assert len(held) == 1 and _record(run)["token"] == held[0].token


def test_a_writer_killed_inside_the_takeover_guard_blocks_no_one(tmp_path):
    """[S2] 5: a writer SIGKILLed while it held the takeover guard (about to remove a stale lock): the next writer
    takes the stale lock over at once (an O_EXCL guard file blocked everyone, then failed "keeps changing hands")."""
    run = tmp_path / "run"
    _dead_lock(run)
    code = ("import os, signal; from pathlib import Path; from dspark_train.runlock import RunLock\n"
            "real = Path.unlink\n"
            "def unlink(self, *a, **k):\n"
            f"    if self == Path({str(lock_path(run))!r}):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(self, *a, **k)\n"
            "Path.unlink = unlink\n"
            f"RunLock({str(run)!r}, 'dspark export').acquire()\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV).returncode == -signal.SIGKILL
    t0 = time.monotonic()
    with RunLock(run, "dspark train"):
        assert _record(run)["pid"] == os.getpid()
    assert time.monotonic() - t0 < 5


def test_a_writer_stuck_inside_the_takeover_guard_is_named(tmp_path, monkeypatch):
    """A live holder of the guard (stopped, say) makes the others wait a bounded time, then refuse naming it."""
    from dspark_train import runlock
    run = tmp_path / "run"
    _dead_lock(run)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(lock_path(run))!r} + '.takeover', os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(runlock, "GUARD_WAIT", 0.5)
        with pytest.raises(LockError, match=rf"\.run\.lock\.takeover: held by pid {holder.pid} for 0.5 s"):
            RunLock(run, "dspark train").acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(run, "dspark train").acquire().release()  # the guard is a kernel lock: the holder's death frees it


def test_a_launched_trainer_adopts_its_launchers_lock(tmp_path):
    run = tmp_path / "run"
    code = ("import json, os; from dspark_train.runlock import holds_lock\n"
            f"@holds_lock(lambda: {str(run)!r}, 'dspark train', main_process_only=True)\n"
            "def body():\n"
            f"    print(json.loads(open({str(lock_path(run))!r}).read())['pid'] == os.getpid())\n"
            "body()\n")
    with RunLock(run, "dspark train") as lock:
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**ENV, TOKEN_ENV: lock.token},
                             capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr  # the trainer's own pid
        assert not lock_path(run).exists()  # released by the trainer when it ended
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**ENV, "RANK": "1"},
                           capture_output=True, text=True)
    assert other.returncode == 1 and "FileNotFoundError" in other.stderr  # rank 1 neither takes nor needs it


# --------------------------------------------------------------------------- every writer holds it
def test_every_writing_command_refuses_while_the_run_is_locked(tmp_path, capsys):
    run = tmp_path / "run"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"turns": ["hi"]}\n')
    data_out = tmp_path / "data.jsonl"
    commands = {
        run: [["train", "recipes/tiny.yaml", "--set", f"train.output_dir={run}"], ["calibrate", str(run)],
              ["eval", "artifact", "--out", str(run), "--benchmarks", str(prompts)]],
        tmp_path / "artifact": [["export", str(run), str(tmp_path / "artifact")],
                                ["export", str(run), str(tmp_path / "artifact"), "--format", "speculators"]],
        data_out.with_name(data_out.name + ".part-0-of-1"): [
            ["data", "recipes/tiny.yaml", "--set", "data.conversations=null", "--set", f"data.prompts={prompts}",
             "--set", f"data.output={data_out}"]],
    }
    for locked, argvs in commands.items():
        with RunLock(locked, "dspark train"):
            for argv in argvs:
                assert cli_main(argv) == 2, argv
                err = capsys.readouterr().err.strip()
                assert err.startswith(f"error: {locked}: dspark train (pid {os.getpid()}") and "\n" not in err, err
    assert not list(tmp_path.glob(".*.lock"))


# --------------------------------------------------------------------------- two real trainers
def _trainer(run: Path, *extra: str, session: bool = False) -> subprocess.Popen:
    sets = [f"train.output_dir={run}", "train.max_steps=16", "train.checkpoint_every=4", "train.eval_every=8",
            "train.log_every=4", "train.num_threads=1", "logging.trackers=[]", "logging.progress_bar=false",
            "data.max_prompts=32", *extra]
    cmd = [sys.executable, "-m", "dspark_train.cli", "train", "recipes/tiny.yaml"] + [a for s in sets
                                                                                   for a in ("--set", s)]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=session)


def _wait_for(cond, timeout=240.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def _adopted(run: Path, launcher: subprocess.Popen) -> bool:
    """The trainer process the launcher started holds the lock (its pid, not the launcher's)."""
    try:
        return _record(run)["pid"] != launcher.pid
    except (FileNotFoundError, json.JSONDecodeError):
        return False


@pytest.mark.slow
def test_second_trainer_on_a_running_run_refuses_and_the_first_finishes(tmp_path, tiny_target):
    from safetensors.torch import load_file

    from dspark_train.artifacts.reader import load_artifact
    from dspark_train.layout import CheckpointFiles, RunDir, read_json

    run = tmp_path / "run"
    first = _trainer(run)
    _wait_for(lambda: _adopted(run, first) or first.poll() is not None)
    holder = _record(run)["pid"]
    t0 = time.time()
    second = _trainer(run)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2 and time.time() - t0 < 60, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == last.strip() and last.startswith(f"error: {run}: dspark train (pid {holder} on "), last
    assert "is writing it" in last and first.poll() is None  # refused while the first was still training
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert not lock_path(run).exists()
    r = RunDir(run)
    assert [c.name for c in r.checkpoint_dirs()] == ["step-000012", "step-000016"]
    for ckpt in r.checkpoint_dirs():
        files = CheckpointFiles(ckpt)
        assert read_json(files.trainer_state)["step"] == int(ckpt.name[-6:])
        assert load_file(str(files.weights)) and load_file(str(files.optimizer))
    assert load_artifact(run, target=tiny_target).config.block_size == 4


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ..., start at 19


def _tree(root: int) -> dict[int, str]:
    """pid → start time of `root` and every process it started, whatever their session (torch's ranks)."""
    parent = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(name)] = (int(_stat(int(name))[1]), _stat(int(name))[19])
        except (OSError, IndexError):
            continue
    tree, todo = {root: parent[root][1]}, [root]
    while todo:
        p = todo.pop()
        for pid, (ppid, start) in parent.items():
            if ppid == p and pid not in tree:
                tree[pid] = start
                todo.append(pid)
    return tree


def _running(tree: dict[int, str]) -> list[int]:
    """Those of `tree` still running (not ended, not a zombie, not a reused pid)."""
    out = []
    for pid, start in tree.items():
        try:
            stat = _stat(pid)
        except OSError:
            continue
        if stat[0] != "Z" and stat[19] == start:
            out.append(pid)
    return out


def _launched_by(pid: int) -> dict:
    """The environment `dspark train` (pid) gives the trainer it starts (runlock.run_tied)."""
    return {**ENV, LAUNCHER_ENV: json.dumps({"pid": pid, "proc_start": _proc_start(pid), **_namespace()})}


def test_a_rank_dies_with_the_agent_that_started_it_in_a_session_of_its_own():
    """[S2] 5: torch's agent starts each rank with start_new_session=True, out of reach of the launcher's group
    signal. A rank ties itself to the agent at its start (tie_to_launcher): a SIGKILLed agent takes it along.
    (The launcher here is this test's process; the agent is tied to it by run_tied in real use.)"""
    rank = ("import time; from dspark_train.runlock import tie_to_launcher\n"
            "tie_to_launcher(); print('tied', flush=True); time.sleep(60)\n")
    agent = ("import subprocess, sys, time\n"
             f"r = subprocess.Popen([sys.executable, '-c', {rank!r}], start_new_session=True)\n"
             "print(r.pid, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", agent], cwd=REPO, env=_launched_by(os.getpid()),
                            stdout=subprocess.PIPE, text=True)
    rank_pid = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "tied"
    tree = _tree(proc.pid)
    assert rank_pid in tree
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while _running(tree) and time.time() < deadline:
        time.sleep(0.05)
    left = _running(tree)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "the rank outlived its agent"


def test_a_trainer_whose_launcher_has_already_ended_does_not_start():
    """Tied first, checked after: a trainer whose launcher died before the tie stops at once; one started through
    another path (ssh, a live launcher that is not its ancestor) or without a launcher trains on."""
    code = "from dspark_train.runlock import tie_to_launcher; tie_to_launcher(); print('training')"
    ended = _ended_pid()
    p = subprocess.run([sys.executable, "-c", code], env={**_launched_by(os.getpid()), LAUNCHER_ENV: json.dumps(
        {"pid": ended, "proc_start": 1, **_namespace()})}, capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == "", p.stdout
    assert p.stderr.strip() == f"error: dspark train (pid {ended}), which started this trainer, has ended"
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for env in (_launched_by(sibling.pid), ENV):
            p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            assert p.returncode == 0 and p.stdout == "training\n", p.stderr
    finally:
        sibling.kill()
        sibling.wait()


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_kill_9_of_a_dspark_train_group_leaves_no_trainer_and_the_rerun_resumes(tmp_path, ranks):
    """[S2] 5, a regression of round 3: `kill -9 -- -PGID` of a `dspark train` started under setsid (a job runner,
    `timeout -s KILL`) reaches the launcher only (the trainer runs in a session of its own, and torch's agent
    starts each rank in another). The trainer, or the agent and every rank, must die with the launcher within
    seconds, not run on orphaned holding the lock; the rerun takes the dead trainer's lock over and resumes from
    its last checkpoint."""
    run = tmp_path / "run"
    extra = ["train.max_steps=400"] + (["distributed.num_processes=2"] if ranks == 2 else [])
    first = _trainer(run, *extra, session=True)  # under setsid
    _wait_for(lambda: _adopted(run, first) and (run / "checkpoints" / "latest").is_file() or first.poll() is not None,
              timeout=600)
    assert first.poll() is None, first.communicate()[1][-3000:]
    tree = _tree(first.pid)
    trainer_pid = _record(run)["pid"]
    assert trainer_pid in tree and len(tree) == (2 if ranks == 1 else 4), tree  # launcher (+ agent) + ranks
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    deadline = time.time() + 10
    while _running(tree) and time.time() < deadline:
        time.sleep(0.1)
    left = _running(tree)
    for pid in left:  # do not leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running 10 s after the launcher's group was killed: {left}"
    assert _record(run)["pid"] == trainer_pid  # left behind by the kill
    second = _trainer(run, "train.max_steps=8", *extra[1:])
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    assert f"{run}: taking over a stale lock of dspark train (pid {trainer_pid} on {socket.gethostname()}" in err
    assert "resuming from" in out + err
    assert not lock_path(run).exists() and (run / "final" / "model.safetensors").is_file()


def test_a_group_of_only_zombies_counts_as_stopped():
    """A rank that exited but was never reaped (orphaned to an init that does not reap) keeps `killpg(pgid, 0)`
    succeeding for ever; the interrupted launcher must not wait on it."""
    from dspark_train.runlock import _live_groups, _processes
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"], start_new_session=True)
    assert _live_groups({child.pid}, _processes()) == {child.pid}
    deadline = time.time() + 30
    while _stat(child.pid)[0] != "Z":  # exited, not reaped
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(child.pid, 0)  # the zombie still answers for its group
    assert not _live_groups({child.pid}, _processes())
    child.wait()
    assert not _live_groups({child.pid}, {})  # without /proc: no member left at all
