"""Data-parallel training on MPI (mpi4py): every rank holds the whole model, reads the same
files and takes its own disjoint share of each global batch; after backward the ranks'
gradients are summed, so that every rank takes the same optimizer step.

    mpiexec -n 2 minisft train ...                  # --batch-size is the global batch
    mpiexec -f hostfile -n 8 minisft train ...      # across hosts

- Each rank's mean loss is scaled by its share of the global batch's loss terms (examples, or
  labeled tokens), so that the summed gradient is the mean over the global batch, exactly
  what one process computes from the same batch.
- Gradients are summed in buckets of about BUCKET_MB, each started (MPI Iallreduce, or NCCL on
  GPUs) as soon as backward has made every gradient in it (the post-accumulate hooks of
  minisft.engine.tensor), so communication runs while backward works on the layers below; the
  optimizer step waits for them. Buckets start in one fixed order on every rank, as MPI
  requires of collectives.
- Every wait on other ranks has a deadline, MINISFT_MPI_TIMEOUT seconds (TIMEOUT_S by
  default; more than the longest checkpoint write, since rank 0 writes while the others
  wait). Past it, a rank asks every other rank for a sign of life, then ends the job naming
  those that gave none, and their hosts: a host that dropped off the network ends the job
  instead of hanging it.
- A process that no MPI launcher started runs alone (SingleProcess) and never imports
  mpi4py.
"""
import hashlib
import json
import os
import pickle
import socket
import sys
import threading
import time

import numpy

from minisft.engine.backend import get_array_module
from minisft.engine.errors import MissingExtra, UserError

LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # MPICH/Intel, Open MPI, MVAPICH
BUCKET_MB = 8
ABORT_DELAY_S = 1.0
TIMEOUT_S = 120.0  # MINISFT_MPI_TIMEOUT's default
PING_WINDOW_S = 5.0  # how long a rank past its deadline waits for the others' signs of life
EXIT_GRACE_S = 5.0  # then how long it may take to say so (its output may go to a host that is gone)
SPIN_S = 1.0  # a wait polls MPI without pause this long (as MPI's own Wait does), then every POLL_S
POLL_S = 1e-3
PING, PONG = 1, 2  # message tags on the communicator of signs of life


class DistributedError(UserError, RuntimeError):
    """Ranks that cannot train together: raised alike on every rank, before training, so
    that every rank can stop without MPI Abort (the command line has rank 0 say it)."""
    alike_on_every_rank = True


class MissingMPI(MissingExtra):
    """Started by an MPI launcher, but mpi4py is not installed."""


def launched_size():
    """How many processes the MPI launcher started (1 without one), from its environment."""
    for name in LAUNCHER_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


class SingleProcess:
    """The communicator of a process that runs alone: every collective is the identity."""
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def __init__(self):
        self.host = socket.gethostname()

    def allreduce_sum(self, value):
        return value

    def allgather(self, value):
        return [value]

    def broadcast_arrays(self, arrays):
        pass

    def barrier(self):
        pass

    def abort(self, code):
        sys.exit(code)


class MPICommunicator(SingleProcess):
    """COMM_WORLD through mpi4py: rank, size, ranks on this host, and the collectives training uses."""

    def __init__(self):
        super().__init__()
        try:
            from mpi4py import MPI
        except ImportError:
            raise MissingMPI(f"started by an MPI launcher as {launched_size()} processes, but mpi4py is "
                                   "not installed: pip install -e '.[mpi]' (or run without mpiexec)") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        host = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = host.Get_rank(), host.Get_size()
        host.Free()
        self.timeout = timeout_from_environment()
        self.signs = self.comm.Dup()  # pings and their answers, apart from training's collectives
        self.answers = []
        self.hosts = self.comm.allgather(self.host)

    def allreduce_sum(self, value):
        """The sum over ranks of a number, or of an array (returned as a new array)."""
        array = numpy.asarray(value)
        out = numpy.empty_like(array)
        self.wait([self.comm.Iallreduce(array, out, op=self.MPI.SUM)], "summing a value over ranks")
        return out if hasattr(value, "shape") else out.item()

    def iallreduce_sum(self, buffer):
        """Start summing a contiguous CPU array over ranks in place; returns the request."""
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)

    def allgather(self, value):
        """Every rank's (picklable) value, in rank order."""
        mine = numpy.frombuffer(pickle.dumps(value), dtype=numpy.uint8)
        sizes = numpy.empty(self.size, dtype=numpy.int64)
        self.wait([self.comm.Iallgather(numpy.array([mine.size], dtype=numpy.int64), sizes)], "gathering from ranks")
        every = numpy.empty(int(sizes.sum()), dtype=numpy.uint8)
        self.wait([self.comm.Iallgatherv(mine, [every, sizes])], "gathering from ranks")
        ends = numpy.cumsum(sizes)
        return [pickle.loads(every[end - size:end].tobytes()) for size, end in zip(sizes, ends)]

    def broadcast(self, value):
        """Rank 0's (picklable) value."""
        mine = numpy.frombuffer(pickle.dumps(value), dtype=numpy.uint8).copy() if self.rank == 0 else None
        size = numpy.array([mine.size if self.rank == 0 else 0], dtype=numpy.int64)
        self.wait([self.comm.Ibcast(size, root=0)], "receiving from rank 0")
        data = mine if self.rank == 0 else numpy.empty(int(size[0]), dtype=numpy.uint8)
        self.wait([self.comm.Ibcast(data, root=0)], "receiving from rank 0")
        return pickle.loads(data.tobytes())

    def broadcast_arrays(self, arrays):
        """Rank 0's arrays into every rank's, in place (through the host for GPU arrays)."""
        for array in arrays:
            host = array if get_array_module(array) is numpy else array.get()
            self.wait([self.comm.Ibcast(host, root=0)], "receiving rank 0's weights")
            if host is not array:
                array.set(host)

    def barrier(self):
        self.wait([self.comm.Ibarrier()], "waiting for every rank")

    def wait(self, requests, what):
        """Wait for MPI requests, answering other ranks' pings meanwhile; after `timeout`
        seconds, end the job naming the ranks that do not answer (see lost)."""
        began = time.monotonic()
        while not self.MPI.Request.Testall(requests):  # MPI moves data on only inside its calls
            self._answer_pings()
            waited = time.monotonic() - began
            if waited > self.timeout:
                self.lost(what)
            if waited > SPIN_S:  # a long wait (a rank writing a checkpoint): free the core
                time.sleep(POLL_S)

    def _answer_pings(self):
        status = self.MPI.Status()
        while self.signs.Iprobe(source=self.MPI.ANY_SOURCE, tag=PING, status=status):
            self.signs.Recv(numpy.empty(1, dtype=numpy.uint8), source=status.Get_source(), tag=PING)
            self.answers.append(self.signs.Isend(numpy.ones(1, dtype=numpy.uint8), dest=status.Get_source(), tag=PONG))
        if self.answers and self.MPI.Request.Testall(self.answers):
            self.answers = []

    def silent_ranks(self, window=PING_WINDOW_S):
        """The other ranks that do not answer a ping within `window` seconds."""
        others = [rank for rank in range(self.size) if rank != self.rank]
        pings = [self.signs.Isend(numpy.ones(1, dtype=numpy.uint8), dest=rank, tag=PING) for rank in others]
        waiting = {rank: self.signs.Irecv(numpy.empty(1, dtype=numpy.uint8), source=rank, tag=PONG) for rank in others}
        end = time.monotonic() + window
        while waiting and time.monotonic() < end:
            self._answer_pings()
            waiting = {rank: request for rank, request in waiting.items() if not request.Test()}
            time.sleep(POLL_S)
        self.MPI.Request.Testall(pings)  # the job ends: a ping not yet delivered is dropped
        return sorted(waiting)

    def lost(self, what):
        """End the job from a rank whose wait passed its deadline: name the ranks (and hosts)
        that do not answer, or, if every rank answers, say that the ranks wait in different
        collectives (a bug). Exits within EXIT_GRACE_S even if saying so blocks."""
        silent = self.silent_ranks(min(PING_WINDOW_S, self.timeout))
        code = 1 if silent else 3
        watchdog = threading.Timer(ABORT_DELAY_S + EXIT_GRACE_S, os._exit, (code,))
        watchdog.daemon = True
        watchdog.start()
        if silent:
            names = ", ".join(f"rank {rank} (host {self.hosts[rank]})" for rank in silent)
            fail(f"no answer from {names} for {self.timeout:g} s while {what}: that host is down or unreachable "
                 "from here, so the job stops (MINISFT_MPI_TIMEOUT sets the wait; --resume continues from the "
                 "last checkpoint)", code)
        fail(f"every rank answers, but {what} did not complete in {self.timeout:g} s: the ranks wait in different "
             "collectives, a bug in minisft", code)

    def abort(self, code):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


_world = None


def world():
    """This process's communicator: MPI's when an MPI launcher started several processes."""
    global _world
    if _world is None:
        _world = MPICommunicator() if launched_size() > 1 else SingleProcess()
    return _world


def fail(message, code):
    """End the whole job from one rank: the message names the rank and its host, then MPI
    Abort stops every rank (none waits forever in a collective). Alone: exit with `code`."""
    try:
        comm = world()
    except MissingMPI:  # the launcher ends the job when this rank exits
        comm = SingleProcess()
    if comm.size > 1:
        print(f"rank {comm.rank} of {comm.size} (host {comm.host}): {message}", file=sys.stderr, flush=True)
        time.sleep(ABORT_DELAY_S)  # the launcher forwards the line before Abort has it stop every process
        comm.abort(code)
        os._exit(code)  # Abort may return before the launcher has stopped this process
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def timeout_from_environment():
    """MINISFT_MPI_TIMEOUT in seconds (TIMEOUT_S when unset)."""
    text = os.environ.get("MINISFT_MPI_TIMEOUT", "").strip()
    try:
        seconds = float(text) if text else TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"MINISFT_MPI_TIMEOUT={text}: not a positive number of seconds; unset it for "
                               f"{TIMEOUT_S:g}, or give the longest a rank may wait for the others, e.g. 300")
    return seconds


def threads_per_rank(comm):
    """The cores this process may use shared among the ranks on its host, unless the user
    chose a thread count (MINISFT_NUM_THREADS, OMP_NUM_THREADS); None then."""
    if any(os.environ.get(name, "").strip() for name in ("MINISFT_NUM_THREADS", "OMP_NUM_THREADS")):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // comm.local_size)


def rank_device(comm, device):
    """The device of this rank: with "cuda" and several ranks on a host, one GPU each."""
    if comm.size == 1 or not str(device).startswith("cuda") or ":" in str(device):
        return device
    import cupy

    return f"cuda:{comm.local_rank % cupy.cuda.runtime.getDeviceCount()}"


# --- what every rank must agree on -----------------------------------------------------------
def per_rank_batch(batch_size, size):
    """The per-rank share of a global batch; an error when the ranks cannot share it evenly."""
    if batch_size % size:
        raise DistributedError(f"--batch-size {batch_size}: the global batch is shared by {size} ranks, and "
                               f"{batch_size} is not a multiple of {size}; use --batch-size "
                               f"{max(size, batch_size // size * size)} or another multiple of {size}")
    return batch_size // size


def fingerprint(features):
    """A hash of encoded features (ids, segments, labels), to compare what ranks read (not
    where: "row" names the file, which may lie elsewhere on each host)."""
    digest = hashlib.sha256()
    for feature in features or ():
        for key in sorted(set(feature) - {"row"}):
            value = feature[key].tolist() if hasattr(feature[key], "tolist") else feature[key]
            digest.update(json.dumps([key, value]).encode())
    return digest.hexdigest()


def check_same_everywhere(comm, values):
    """values: {what: (value, fix)}. Raises DistributedError on every rank when ranks differ
    on any, naming the ranks (and hosts) of each value."""
    seen = comm.allgather((comm.host, {what: str(value) for what, (value, _) in values.items()}))
    for what, (_, fix) in values.items():
        groups = {}
        for rank, (host, mine) in enumerate(seen):
            groups.setdefault(mine[what], []).append(f"{rank} ({host})")
        if len(groups) > 1:
            found = "; ".join(f"rank{'s' * (len(ranks) > 1)} {', '.join(ranks)}: {value[:16]}"
                              for value, ranks in groups.items())
            raise DistributedError(f"the ranks differ in {what} ({found}); {fix}")


def shard(indices, rank, size):
    """This rank's contiguous part of a global batch; parts differ by at most one (a short
    last batch), and a rank may get none."""
    base, extra = divmod(len(indices), size)
    start = rank * base + min(rank, extra)
    return indices[start:start + base + (rank < extra)]


def rank_seed(seed, rank, step):
    """The seed of a rank's random draws (dropout) at a step: resuming at any step, with any
    number of ranks, draws what an uninterrupted run with that number draws."""
    return int(numpy.random.SeedSequence([seed, rank, step]).generate_state(1, numpy.uint64)[0])


# --- gradients -----------------------------------------------------------------------------
class GradientReducer:
    """Sums the ranks' gradients of the trainable `parameters` in buckets started during
    backward. Per step: start() before the backward that completes the gradients (the last
    micro-batch's), then wait() before clipping and the optimizer step."""

    def __init__(self, comm, parameters, bucket_mb=BUCKET_MB):
        params = list({id(p): p for p in parameters if p.requires_grad}.values())  # each once, if shared
        self.comm = comm
        self.buckets, current, size = [], [], 0
        for param in reversed(params):  # backward makes the top layers' gradients first
            current.append(param)
            size += param.data.nbytes
            if size >= bucket_mb * 2 ** 20:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.params = [p for bucket in self.buckets for p in bucket]
        self.first = numpy.cumsum([0] + [len(bucket) for bucket in self.buckets])  # bucket i's place in params
        self.transport = _nccl_or_mpi(comm, params[0].data) if params else None
        self.active = False
        self.wait_seconds = 0.0  # communication not hidden behind backward, summed over steps
        for param in params:
            param.register_post_accumulate_grad_hook(self._ready)

    def start(self):
        self.active = True
        self.missing = [len(bucket) for bucket in self.buckets]
        self.had_grad = numpy.zeros(len(self.params), dtype=numpy.int32)
        self.pending = []  # (flat buffer, request) in bucket order
        self.next = 0  # the next bucket to start: buckets start in order on every rank

    def _ready(self, param):
        if not self.active:
            return
        self.missing[self.bucket_of[id(param)]] -= 1
        while self.next < len(self.buckets) and self.missing[self.next] == 0:
            self._launch(self.next)
        self.transport.progress(self.pending)

    def _launch(self, index):
        """Copy the bucket's gradients (zeros where none) into one flat buffer, make each
        gradient a view of it, and start the sum."""
        bucket = self.buckets[index]
        xp = get_array_module(bucket[0].data)
        flat = xp.empty(sum(p.data.size for p in bucket), dtype=bucket[0].data.dtype)
        offset, start = self.first[index], 0
        for i, param in enumerate(bucket):
            view = flat[start:start + param.data.size].reshape(param.data.shape)
            if param.grad is None:
                view[...] = 0
            else:
                view[...] = param.grad
                self.had_grad[offset + i] = 1
            param.grad = view
            start += param.data.size
        self.pending.append((flat, self.transport.start(flat)))
        self.next = index + 1

    def wait(self):
        """Start what backward did not (every bucket, on a rank without examples), wait for
        all, and leave no gradient on parameters that had none on any rank."""
        began = time.perf_counter()
        while self.next < len(self.buckets):
            self._launch(self.next)
        self.transport.wait(self.pending)
        used = self.comm.allreduce_sum(self.had_grad)
        for param, count in zip(self.params, used):
            if not count:
                param.grad = None
        self.active = False
        self.pending = []
        self.wait_seconds += time.perf_counter() - began


class _MPITransport:
    """Bucket sums through MPI's non-blocking all-reduce (CPU arrays)."""

    def __init__(self, comm):
        self.comm = comm

    def start(self, flat):
        return self.comm.iallreduce_sum(flat)

    def progress(self, pending):
        """Let MPI move the started sums on (MPI progresses inside its own calls)."""
        self.comm.MPI.Request.Testall([request for _, request in pending])

    def wait(self, pending):
        self.comm.wait([request for _, request in pending], "summing gradients")


class _NCCLTransport:
    """Bucket sums through NCCL on the GPU, on a stream of their own that waits for the
    gradients' stream; the NCCL id goes to every rank over MPI. Not yet verified on a GPU."""

    def __init__(self, comm):
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl = cupy, nccl
        unique_id = comm.broadcast(nccl.get_unique_id() if comm.rank == 0 else None)
        self.communicator = nccl.NcclCommunicator(comm.size, unique_id, comm.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def start(self, flat):
        self.stream.wait_event(self.cupy.cuda.get_current_stream().record())
        self.communicator.allReduce(flat.data.ptr, flat.data.ptr, flat.size, self.nccl.NCCL_FLOAT32,
                                    self.nccl.NCCL_SUM, self.stream.ptr)
        return self.stream.record()

    def progress(self, pending):
        pass

    def wait(self, pending):
        for _, done in pending:
            self.cupy.cuda.get_current_stream().wait_event(done)


def _nccl_or_mpi(comm, array):
    if comm.size == 1:
        return None
    return _MPITransport(comm) if get_array_module(array) is numpy else _NCCLTransport(comm)
