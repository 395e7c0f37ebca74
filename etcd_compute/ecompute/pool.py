"""The worker pool: spawned processes that run the daemon's jobs, each job within a deadline.

A job that outlives its deadline (a hung libvirt call, an image server that drips) is
stopped by killing its worker, which is then replaced: only a process boundary can stop
a call stuck in C. concurrent.futures' process pool cannot do that: killing one of its
workers breaks the whole pool and every job in it. Here each slot is one thread that
owns one worker process and speaks to it over a pipe, so a slot can kill its own worker
alone. Slot 0's worker, once started, stays (an idle host keeps one warm worker);
the others start while jobs queue and retire after `idle_timeout` seconds without work.

Workers are spawned, never forked (context()), so they never share the daemon's gRPC
channel; each asks the kernel to kill it when its slot thread ends (PR_SET_PDEATHSIG is
tied to the thread that started the process), so a daemon that dies, even by SIGKILL,
takes its workers with it. This module loads neither libvirt nor the worker's code:
the worker process imports them (_serve).
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

from etcd_compute.ecompute.jobs import Job, JobResult, WorkerSettings

LOG = logging.getLogger(__name__)
Done = Callable[[JobResult], None]


class Runner(Protocol):
    """What runs the daemon's jobs: WorkerPool, or ThreadRunner (in-process, over a fake hypervisor)."""

    def submit(self, job: Job, timeout: float | None, done: Done) -> None: ...
    def run(self, job: Job, timeout: float | None) -> JobResult: ...
    def kill_all(self, why: str) -> None: ...
    def close(self) -> None: ...


def context() -> multiprocessing.context.SpawnContext:
    """How worker processes start: spawned, a fresh interpreter that never shares the daemon's
    gRPC threads or channel (fork would copy them). Measured against forkserver (bench/agents.py,
    issue 13): an idle host runs one worker, and a fork server with the driver preloaded is a
    process of its own (~12 MB PSS) whose children still dirty ~5 MB each (CPython 3.11 writes
    every refcount it touches): spawn is ~10 MB lighter with one libvirt process, forkserver
    ~7 MB lighter with two. Either way multiprocessing starts its resource tracker."""
    return multiprocessing.get_context("spawn")


def _serve(settings: WorkerSettings, conn: Connection) -> None:
    """The worker process's entry (spawned: it imports the worker's code, and libvirt, here)."""
    from etcd_compute.ecompute import worker
    worker.serve(settings, conn)


def _watch_events(settings: WorkerSettings, events: Any) -> None:
    """The lifecycle-event listener process's entry (see worker.watch_events)."""
    from etcd_compute.ecompute import worker
    worker.watch_events(settings, events)


def start_listener(settings: WorkerSettings, events: Any, name: str) -> multiprocessing.process.BaseProcess:
    """Start the lifecycle-event listener in a process of its own (only workers load libvirt)."""
    proc = context().Process(target=_watch_events, args=(settings, events), name=name, daemon=True)
    proc.start()
    return proc


@dataclass
class _Task:
    job: Job
    timeout: float | None  # seconds the job may run in its worker; None: no deadline
    done: Done
    epoch: int  # the pool's epoch when submitted: kill_all() ends every task of an older one


class WorkerPool:
    """Up to `size` worker processes running jobs from one queue; see the module docstring."""

    def __init__(self, settings: WorkerSettings, size: int, *, idle_timeout: float = 60.0,
                 name: str = "worker") -> None:
        self.settings, self.size, self.idle_timeout, self.name = settings, size, idle_timeout, name
        self._tasks: queue.Queue[_Task | None] = queue.Queue()
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._epoch = 0
        self._closed = False
        self.killed = 0  # workers killed at a deadline or by kill_all (diagnostics, metrics)

    def submit(self, job: Job, timeout: float | None, done: Done) -> None:
        """Run `job` in a worker; done(result) is called from a pool thread when it ends, whatever
        happens: past `timeout` seconds of running its worker is killed (result.timed_out)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("worker pool closed")
            self._tasks.put(_Task(job, timeout, done, self._epoch))
            busy = sum(1 for s in self._slots.values() if s.busy)
            if busy + self._tasks.qsize() > len(self._slots) and len(self._slots) < self.size:
                index = next(i for i in range(self.size) if i not in self._slots)
                self._slots[index] = _Slot(self, index)

    def run(self, job: Job, timeout: float | None) -> JobResult:
        """Run `job` and wait for its result (bounded by `timeout` plus a worker's start-up)."""
        finished: queue.Queue[JobResult] = queue.Queue()
        self.submit(job, timeout, finished.put)
        return finished.get()

    def kill_all(self, why: str) -> None:
        """End every queued and running job now: queued ones are never started, running ones
        have their workers killed; each reports `interrupted`. For a host that lost its lease:
        no job begun under it may go on."""
        with self._lock:
            self._epoch += 1
            slots = list(self._slots.values())
        for slot in slots:
            slot.kill(why)

    def pids(self) -> list[int]:
        with self._lock:
            return [pid for s in self._slots.values() if (pid := s.pid()) is not None]

    def close(self) -> None:
        """Stop every worker; queued jobs report `interrupted`."""
        with self._lock:
            self._closed = True
            slots = list(self._slots.values())
            for _ in slots:
                self._tasks.put(None)
        for slot in slots:
            slot.kill("the daemon stops")
        for slot in slots:
            slot.thread.join(5)

    # -- used by the slots --------------------------------------------------------------------

    def _next(self, slot: _Slot) -> _Task | None:
        """The next task for `slot`, or None when it should retire (idle, or the pool closed)."""
        while True:
            try:
                task = self._tasks.get(timeout=None if slot.index == 0 else self.idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._tasks.empty():
                        del self._slots[slot.index]
                        return None
                continue
            if task is None:
                return None
            if task.epoch != self._epoch:  # submitted before kill_all(): never started
                _report(task, JobResult(ok=False, interrupted=True, reason="cancelled: the host lost its lease"))
                continue
            return task


class _Slot:
    """One thread and the worker process it owns."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool, self.index = pool, index
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.busy = False
        self._kill_reason: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"{pool.name}-{index}", daemon=True)
        self.thread.start()

    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def kill(self, why: str) -> None:
        proc = self.proc
        if proc is not None and proc.is_alive():
            self._kill_reason = why
            proc.kill()

    def _run(self) -> None:
        try:
            while (task := self.pool._next(self)) is not None:
                self.busy = True
                try:
                    result = self._execute(task)
                finally:
                    self.busy = False
                _report(task, result)
        except Exception:  # noqa: BLE001 - a slot must never take the pool down with it
            LOG.exception("worker slot %d failed", self.index)
            with self.pool._lock:
                self.pool._slots.pop(self.index, None)
        finally:
            self._stop()

    def _start(self) -> None:
        parent, child = context().Pipe()
        proc = context().Process(target=_serve, args=(self.pool.settings, child),
                                 name=f"ecompute-{self.pool.name}-{self.index}", daemon=True)
        proc.start()
        child.close()
        self.proc, self.conn = proc, parent

    def _execute(self, task: _Task) -> JobResult:
        if self.proc is None or not self.proc.is_alive():
            self._stop()
            self._start()
        assert self.conn is not None and self.proc is not None
        self._kill_reason = None
        started = time.monotonic()
        try:
            self.conn.send(task.job)
            if self.conn.poll(task.timeout):
                result: JobResult = self.conn.recv()
                return result
        except (EOFError, OSError):
            pass  # the worker died: below
        if self.proc.is_alive() and self._kill_reason is None:  # past its deadline
            self.pool.killed += 1
            self.proc.kill()
            self.proc.join(5)
            took = time.monotonic() - started
            LOG.warning("%s of %s did not finish within %.0fs: its worker was killed", task.job.kind.value,
                        task.job.uuid or "the host", took)
            self._stop()
            return JobResult(ok=False, timed_out=True, seconds=took,
                             reason=f"{task.job.kind.value} did not finish within {task.timeout:.0f}s; "
                                    "its worker was killed")
        killed = self._killed()
        why = killed or f"worker process died (exit {self.proc.exitcode})"
        if killed:
            self.pool.killed += 1
        self._stop()
        return JobResult(ok=False, interrupted=True, reason=why)

    def _killed(self) -> str | None:
        """Why kill() ended this slot's worker, if it did (set from another thread)."""
        return self._kill_reason

    def _stop(self) -> None:
        proc, conn = self.proc, self.conn
        self.proc = self.conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)


def _report(task: _Task, result: JobResult) -> None:
    try:
        task.done(result)
    except Exception:  # noqa: BLE001 - a callback's bug must not end the slot
        LOG.exception("reporting the result of %s %s failed", task.job.kind.value, task.job.uuid)



class ThreadRunner:
    """Jobs on threads of this process, over one Worker: the daemon's loop, in-process, against a
    fake hypervisor (fake:///DIR), for scenarios that need no QEMU and no worker processes (tests,
    simulated fleets). A thread cannot be killed: past its deadline, or when all are killed (the
    host lost its lease), its job is reported as the pool reports a killed worker's, and the
    thread left to end by itself (a fake hypervisor's hang ends when its file goes)."""

    def __init__(self, settings: WorkerSettings) -> None:
        from etcd_compute.ecompute.worker import Worker
        self.worker = Worker(settings)
        self._lock = threading.Lock()
        self._epoch = 0
        self._running: dict[int, Callable[[JobResult], None]] = {}  # id -> its end, for kill_all
        self.threads: list[threading.Thread] = []

    def submit(self, job: Job, timeout: float | None, done: Done) -> None:
        epoch, ended = self._epoch, threading.Event()

        def end(result: JobResult) -> None:
            with self._lock:
                if ended.is_set():
                    return
                ended.set()
                self._running.pop(id(ended), None)
                if epoch != self._epoch:
                    result = JobResult(ok=False, interrupted=True, reason="the host lost its lease")
            _report(_Task(job, timeout, done, epoch), result)

        with self._lock:
            self._running[id(ended)] = end

        def go() -> None:
            end(self.worker.run(job))

        thread = threading.Thread(target=go, name=f"job {job.kind.value}", daemon=True)
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()
        if timeout is not None:
            timer = threading.Timer(timeout, end, [JobResult(
                ok=False, timed_out=True, reason=f"{job.kind.value} did not finish within {timeout:.0f}s; "
                                                 "its worker was killed")])
            timer.daemon = True
            timer.start()

    def run(self, job: Job, timeout: float | None) -> JobResult:
        finished: queue.Queue[JobResult] = queue.Queue()
        self.submit(job, timeout, finished.put)
        return finished.get()

    def kill_all(self, why: str) -> None:
        with self._lock:
            self._epoch += 1
            running = list(self._running.values())
        for end in running:
            end(JobResult(ok=False, interrupted=True, reason=why))

    def close(self) -> None:
        self.kill_all("closed")
