"""Several processes writing one export: ``--jobs N`` forked workers, or the ranks of a torchrun job.

The driver (:mod:`.run`) sees a :class:`Team`. One member, the leader (the parent of ``--jobs``,
rank 0 under torchrun), holds the output lock, prepares the staging directory, adopts every
member's finished files, writes ``index.json`` and publishes; the members each write the output
parts ``≡ k (mod N)`` (:func:`.rows.export_rows`). A part's bytes do not depend on who wrote it,
so the export is byte-identical for any N.

Failures: a worker's error comes back to the leader as the same error class and message; a worker
that dies (kill -9, out of memory) is named with its exit status. Under torchrun every rank takes
part in the same three collective steps (stage ready, parts done, published) whatever happened,
each carrying either its payload or the error, so every rank ends with the same one-line error
instead of waiting; a rank that vanishes makes the others' collective fail (gloo), at the latest
after ``--timeout`` seconds. Nothing is published unless every part is complete, and the leader's
abort removes the stage, so a rerun starts clean.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

from ..distributed import usable_cpus
from ..errors import ConfigError, DataPruneError, check_stop

PROGRESS_EVERY = 0.2  # seconds between a worker's progress messages
STOPS = {signal.SIGINT, signal.SIGTERM}  # held back while a worker is forked (see Jobs.parts)
AUTO_BYTES = 64 << 20  # selected bytes per process that --jobs auto starts (a worker's fork and exit cost ~10 ms)
AUTO_MAX = 8  # processes --jobs auto starts at most (beyond, the disk rather than the CPUs bounds a copy)


def auto_jobs(nbytes: int, parts: int) -> int:
    """``--jobs auto`` for an export of ``nbytes`` selected bytes into ``parts`` output parts: one
    process per AUTO_BYTES, at most one per usable CPU (AUTO_MAX at most) and per part; one where
    fork() is missing. The output is the same bytes whatever it picks."""
    if "fork" not in mp.get_all_start_methods():
        return 1
    return int(max(1, min(usable_cpus(), AUTO_MAX, parts, -(-max(0, nbytes) // AUTO_BYTES))))


class PartFailed(DataPruneError):
    """Another member of a parallel export stopped before its parts were complete."""

    exit_code = 1


def pack_error(e: BaseException) -> tuple:
    """An exception as plain data that survives pickling (keyword-only fields such as ``reason`` included)."""
    if isinstance(e, OSError):
        return ("os", e.errno, e.strerror or str(e), e.filename)
    cls = type(e) if isinstance(e, DataPruneError) else None
    return ("dp", cls, str(e), dict(getattr(e, "__dict__", {}))) if cls else ("other", type(e).__name__, str(e))


def unpack_error(p: tuple, who: str) -> BaseException:
    """The exception :func:`pack_error` packed (a DataPruneError keeps its class, so its exit code)."""
    if p[0] == "os":
        return OSError(p[1], f"{who}: {p[2]}", p[3])
    if p[0] == "dp":
        e = p[1].__new__(p[1])
        Exception.__init__(e, p[2] if p[2].startswith(who) else f"{who}: {p[2]}")
        e.__dict__.update(p[3])
        return e
    if p[1] == "KeyboardInterrupt":  # the worker was stopped (Ctrl-C, SIGTERM): so is the export
        return KeyboardInterrupt()
    return PartFailed(f"{who} failed: {p[1]}: {p[2]}")


class Team:
    """Who writes which parts. ``size`` members; this process is ``rank``; ``leader`` publishes."""

    size = 1
    rank = 0
    leader = True

    def share(self, payload: Any = None, error: BaseException | None = None) -> Any:
        """The leader's ``payload`` on every member; the leader's ``error`` is raised on the others."""
        return payload

    def parts(self, work: Callable[[int, int, Callable], Any], progress) -> list[Any]:
        """Run ``work(k, size, progress)`` for every member ``k``; the leader gets every result."""
        return [work(0, 1, progress)]

    def close(self) -> None:
        pass


class Jobs(Team):
    """``--jobs N``: N forked worker processes write the parts; this process leads."""

    def __init__(self, n: int, timeout: float):
        if "fork" not in mp.get_all_start_methods():
            raise ConfigError("--jobs needs a platform with fork(); run without --jobs")
        self.size, self.timeout = n, timeout

    def parts(self, work, progress) -> list[Any]:
        ctx = mp.get_context("fork")
        procs, conns = [], []
        try:
            for k in range(self.size):
                r, w = ctx.Pipe(duplex=False)
                # A stop (Ctrl-C, SIGTERM) during the fork would be raised inside an at-fork hook and dropped, or
                # kill the worker in multiprocessing's start-up: it is held back until the worker's own code runs
                # (``_child`` restores the mask) and, here, until the fork is over.
                old = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
                try:
                    p = ctx.Process(target=_child, args=(work, k, self.size, w, os.getpid(), old), name=f"dataprune-export-{k}",
                                    daemon=True)
                    p.start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
                w.close()
                procs.append(p)
                conns.append(r)
            results: list[Any] = [None] * self.size
            pending = set(range(self.size))
            heard = [time.monotonic()] * self.size
            while pending:
                check_stop()  # a stop whose KeyboardInterrupt Python dropped (see errors.request_stop)
                wait([conns[k] for k in pending] + [procs[k].sentinel for k in pending], timeout=1.0)
                for k in sorted(pending):
                    msg = _drain(conns[k], progress, heard, k)
                    if msg is None and time.monotonic() - heard[k] > self.timeout:
                        raise PartFailed(f"export job {k} of {self.size} (pid {procs[k].pid}) sent nothing for {self.timeout:g} s "
                                         "(--timeout); stopped, nothing was published — run the same command again")
                    if msg is not None and msg[0] == "done":
                        results[k] = msg[1]
                        pending.discard(k)
                    elif msg is not None:
                        raise unpack_error(msg[1], f"export job {k} of {self.size}")
                    elif not procs[k].is_alive() and (msg := _drain(conns[k], progress, heard, k)) is not None:
                        # it sent its last message between the drain above and its exit: take it
                        if msg[0] != "done":
                            raise unpack_error(msg[1], f"export job {k} of {self.size}")
                        results[k] = msg[1]
                        pending.discard(k)
                    elif not procs[k].is_alive():
                        procs[k].join()
                        raise PartFailed(f"export job {k} of {self.size} (pid {procs[k].pid}) {_how(procs[k].exitcode)} before its "
                                         f"output parts (those ≡ {k} mod {self.size}) were complete; nothing was published — "
                                         "run the same command again")
            return results
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()  # SIGTERM: the worker removes its unfinished files
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
            for c in conns:
                c.close()


def _how(code: int | None) -> str:
    return f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"


def _drain(conn, progress, heard: list[float], k: int) -> tuple | None:
    """Read what worker ``k`` sent: progress is passed on; returns its final message, if it came."""
    while True:
        try:
            if not conn.poll():
                return None
            msg = conn.recv()
        except (EOFError, OSError):
            return None
        heard[k] = time.monotonic()
        if msg[0] != "progress":
            return msg
        if progress is not None:
            progress(msg[1], msg[2])


def _child(work, k: int, n: int, conn, parent: int, mask: set) -> None:
    """A forked worker: write parts ``≡ k (mod n)``, send the result (or the error), leave at once
    (``os._exit``: nothing of the parent's — buffers, locks, exit handlers — runs twice). It starts
    with SIGINT/SIGTERM held back (``Jobs.parts``) and takes them once it can report them."""
    code = 0
    pending, last = [0, 0], [time.monotonic()]

    def progress(m: int, b: int) -> None:
        pending[0] += m
        pending[1] += b
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY:  # also the parent's sign of life (--timeout)
            conn.send(("progress", pending[0], pending[1]))
            pending[:] = [0, 0]
            last[0] = now

    try:
        _die_with_parent(parent)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # the parent's own mask: a stop that came meanwhile is raised here
        result = work(k, n, progress)
        if pending[0]:
            conn.send(("progress", pending[0], pending[1]))
        conn.send(("done", result))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which raises it
        code = 1
        try:
            conn.send(("error", pack_error(e)))
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            conn.close()
        finally:
            os._exit(code)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when its parent dies (a kill -9 of the export), so that it stops,
    removes its unfinished files and lets go of the output lock it inherited. A parent that died
    before this was armed is no longer this process's parent: then the worker leaves at once."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


class Ranks(Team):
    """torchrun: every rank writes the parts ``≡ rank (mod world)``; rank 0 leads. The steps are gloo
    collectives with ``timeout``; each carries ``("ok", payload)`` or ``("error", packed)``."""

    def __init__(self, rank: int, world: int, timeout: float):
        import torch.distributed as dist

        self.dist, self.rank, self.size, self.leader = dist, rank, world, rank == 0
        self.own = not dist.is_initialized()
        if self.own:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)) if not self.own else None
        self.timeout = timeout

    def _collective(self, fn, what: str):
        try:
            return fn()
        except RuntimeError as e:  # a rank vanished or --timeout passed: gloo says so
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise PartFailed(f"export rank {self.rank} of {self.size}: another rank stopped answering while {what} ({msg}); "
                             "nothing was published — run the same command again") from None

    def share(self, payload: Any = None, error: BaseException | None = None) -> Any:
        box = [(("error", pack_error(error)) if error is not None else ("ok", payload)) if self.leader else None]
        self._collective(lambda: self.dist.broadcast_object_list(box, src=0, group=self.group), "waiting for rank 0")
        status, value = box[0]
        if status == "error" and not self.leader:
            raise unpack_error(value, f"export rank 0 of {self.size}")
        return value

    def parts(self, work, progress) -> list[Any]:
        try:
            mine = ("ok", work(self.rank, self.size, progress))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - told to every rank at the next step
            mine = ("error", pack_error(e))
        got: list[Any] = [None] * self.size
        self._collective(lambda: self.dist.all_gather_object(got, mine, group=self.group), "the ranks were finishing their parts")
        for k, (status, value) in enumerate(got):
            if status == "error":
                if k == self.rank:
                    raise unpack_error(value, f"export rank {k} of {self.size}")
                raise PartFailed(f"export rank {self.rank} of {self.size}: rank {k} failed ({unpack_error(value, f'rank {k}')}); "
                                 "nothing was published")
        return [v for _, v in got]

    def close(self) -> None:
        if self.own and self.dist.is_initialized():
            self.dist.destroy_process_group()


def team(jobs: int, rank: int, world: int, timeout: float) -> Team:
    """The team of this export: torchrun's ranks, ``--jobs`` workers, or this process alone."""
    if world > 1:
        if jobs > 1:
            raise ConfigError("--jobs and torchrun do not combine: under torchrun every rank is one writer (drop --jobs)")
        return Ranks(rank, world, timeout)
    return Jobs(jobs, timeout) if jobs > 1 else Team()
