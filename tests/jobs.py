"""Job types the tests dispatch. Importable, so standalone worker processes can run them."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

from neonnb import Context, Job, Priority, Retry
from tests.conftest import Recorder

RECORD = Recorder()
RELEASE = threading.Event()  # sync blockers wait on this


class Note(Job):
    """Records its tag when it runs."""

    tag: str

    def handle(self, ctx: Context) -> str:
        RECORD.add(self.tag)
        return self.tag


class AsyncNote(Job):
    tag: str

    async def handle(self, ctx: Context) -> str:
        RECORD.add(self.tag)
        return self.tag


class Flaky(Job):
    """Fails until its attempt reaches `succeed_on` (0 = always fails)."""

    succeed_on: int = 0
    attempts: int = 5

    def handle(self, ctx: Context) -> int:
        RECORD.add(("flaky", ctx.attempt))
        if self.succeed_on and ctx.attempt >= self.succeed_on:
            return ctx.attempt
        raise ConnectionError(f"flaky attempt {ctx.attempt}")

    def max_attempts(self) -> int:
        return self.attempts


class Permanent(Job):
    """Fails with an error its should_retry refuses."""

    def handle(self, ctx: Context) -> None:
        raise ValueError("bad input, don't retry")

    def should_retry(self, err: Exception) -> bool:
        return not isinstance(err, ValueError)


class CustomDelay(Job):
    def handle(self, ctx: Context) -> None:
        raise ConnectionError("rate limited")

    def retry_delay(self, attempt: int, err: Exception) -> float:
        return 7.0 * attempt


class AskRetry(Job):
    def handle(self, ctx: Context) -> None:
        raise Retry("upstream busy", delay=42)


class Urgent(Job):
    tag: str
    urgent: bool

    def handle(self, ctx: Context) -> None:
        RECORD.add(self.tag)

    def priority(self) -> Priority:
        return Priority.HIGH if self.urgent else Priority.LOW


class SlowAsync(Job):
    seconds: float

    async def handle(self, ctx: Context) -> str:
        RECORD.add("slow-start")
        await asyncio.sleep(self.seconds)
        return "done"


class Counted(Job):
    """Records each run of job ``n``; takes ``seconds``."""

    n: int
    seconds: float

    def handle(self, ctx: Context) -> int:
        RECORD.add(f"ran-{self.n}")
        time.sleep(self.seconds)
        return self.n


class Sized(Job):
    """Returns a text of ``size`` characters."""

    size: int

    def handle(self, ctx: Context) -> str:
        return "x" * self.size

    def max_attempts(self) -> int:
        return 3


STARTS: list[tuple[float, str]] = []  # (time.monotonic(), key) of each start of a limited job


class Limited(Job):
    """At most 10 start per second, across every worker."""

    n: int
    rate_limit = "10/s"

    def handle(self, ctx: Context) -> int:
        STARTS.append((time.monotonic(), ""))
        return self.n


class LimitedPerCustomer(Job):
    """At most 5 start per second for each customer."""

    customer: str
    n: int
    rate_limit = "5/s"
    limit_key = "customer"

    def handle(self, ctx: Context) -> int:
        STARTS.append((time.monotonic(), self.customer))
        return self.n


RUNS: list[tuple[float, float, str]] = []  # (start, end, key) of each run of a Crowded job


class Crowded(Job):
    """At most 2 run at once for each customer; each takes 0.2 s."""

    customer: str
    n: int
    concurrency = 2
    limit_key = "customer"

    def handle(self, ctx: Context) -> int:
        start = time.monotonic()
        time.sleep(0.2)
        RUNS.append((start, time.monotonic(), self.customer))
        return self.n


class BlockingSync(Job):
    """Runs until RELEASE is set or the worker asks it to stop."""

    def handle(self, ctx: Context) -> str:
        RECORD.add("blocking-start")
        while not RELEASE.is_set() and not ctx.cancelled:
            time.sleep(0.01)
        return "released"


class Crashable(Job):
    """For the crash tests: logs its start and end to a file shared between processes.
    With `hang`, its first attempt hangs so the test can kill the worker mid-job."""

    n: int
    log: str
    seconds: float = 0.01
    hang: bool = False

    def handle(self, ctx: Context) -> int:
        path = Path(self.log)
        with path.open("a") as f:
            f.write(f"start {ctx.job_id} {ctx.attempt} {os.getpid()}\n")
        time.sleep(60 if self.hang and ctx.attempt == 1 else self.seconds)
        with path.open("a") as f:
            f.write(f"end {ctx.job_id} {ctx.attempt} {os.getpid()}\n")
        return self.n


class Progressing(Job):
    steps: int

    def handle(self, ctx: Context) -> int:
        for i in range(self.steps):
            ctx.progress(i + 1, self.steps, f"step {i + 1}")
        return self.steps


class Chatty(Job):
    """Prints, writes to stderr and logs, from a thread (sync) or the loop (async twin)."""

    words: str

    def handle(self, ctx: Context) -> str:
        print(f"stdout: {self.words}")
        print(f"stderr: {self.words}", file=sys.stderr)
        ctx.logger.warning("log: %s", self.words)
        return self.words


class ChattyAsync(Job):
    words: str

    async def handle(self, ctx: Context) -> str:
        print(f"async stdout: {self.words}")
        await asyncio.sleep(0)
        ctx.logger.warning("async log: %s", self.words)
        return self.words


class AddToPrevious(Job):
    """A chain step: the previous step's result plus n."""

    n: int

    def handle(self, ctx: Context) -> int:
        RECORD.add(("add", self.n, ctx.previous))
        return int(ctx.previous or 0) + self.n


GATE = threading.Event()  # Gated jobs fail while it is clear


class Gated(Job):
    def handle(self, ctx: Context) -> int:
        if not GATE.is_set():
            raise RuntimeError("the gate is closed")
        return int(ctx.previous) * 10

    def max_attempts(self) -> int:
        return 1


class DailyReport(Job):
    """Unique per day."""

    day: str

    def handle(self, ctx: Context) -> str:
        return self.day

    def unique_key(self) -> str:
        return f"report:{self.day}"


class Halfway(Job):
    """Reports 1 of 2 steps, then waits for RELEASE (a running job with progress to look at)."""

    def handle(self, ctx: Context) -> str:
        ctx.progress(1, 2, "half way")
        RELEASE.wait(30)
        return "done"


class UsesDependency(Job):
    key: str

    def handle(self, ctx: Context) -> str:
        return str(ctx.deps[self.key])


class TimesOutAsync(Job):
    async def handle(self, ctx: Context) -> None:
        await asyncio.sleep(60)

    def timeout(self) -> float:
        return 0.1

    def max_attempts(self) -> int:
        return 1


class TimesOutSync(Job):
    """Loops until the worker flags it cancelled (sync threads can't be killed)."""

    def handle(self, ctx: Context) -> None:
        while not ctx.cancelled:
            time.sleep(0.005)
        RECORD.add("noticed-cancel")

    def timeout(self) -> float:
        return 0.1

    def max_attempts(self) -> int:
        return 1


class Unstorable:
    """Not JSON: a job field holding one must be refused at dispatch."""


class HoldsObject(Job):
    name: str
    conn: object

    def handle(self, ctx: Context) -> None:
        pass


class Renamed(Job, job_name="reports.renamed"):
    """Stored under a name of its choosing, so it can move between modules."""

    def handle(self, ctx: Context) -> str:
        return ctx.name


class Exits(Job):
    """Ends its handler the way a script would: sys.exit(), or a KeyboardInterrupt."""

    how: str

    def handle(self, ctx: Context) -> None:
        if self.how == "exit":
            sys.exit(3)
        raise KeyboardInterrupt("pressed in the job")


class ExitsAsync(Job):
    how: str

    async def handle(self, ctx: Context) -> None:
        await asyncio.sleep(0)
        if self.how == "exit":
            sys.exit(4)
        raise KeyboardInterrupt("pressed in the async job")


class Stubborn(Job):
    """A sync job that ignores ctx.cancelled: it runs until RELEASE is set."""

    timeout_s: float = 0.0

    def handle(self, ctx: Context) -> str:
        RECORD.add("stubborn-start")
        RELEASE.wait(60)
        return "finally"

    def timeout(self) -> float | None:
        return self.timeout_s or None

    def max_attempts(self) -> int:
        return 1


class StubbornThenRaises(Stubborn):
    """Like Stubborn, but once let go it raises: it did not finish its work."""

    def handle(self, ctx: Context) -> str:
        super().handle(ctx)
        raise RuntimeError("stopped part-way")


class SeedRetryDelay(Job):
    """The spec's RetryDelay(): no arguments."""

    def handle(self, ctx: Context) -> None:
        raise ConnectionError("try later")

    def retry_delay(self) -> float:
        return 3.0


class RaisingShouldRetry(Job):
    def handle(self, ctx: Context) -> None:
        raise ConnectionError("the real problem")

    def should_retry(self, err: Exception) -> bool:
        raise TypeError("should_retry is broken")


class Collect(Job):
    """A batch's callback: returns what it received."""

    def handle(self, ctx: Context) -> object:
        RECORD.add("collected")
        return ctx.previous


class Last(Job):
    """One attempt only: a job whose worker dies under it fails for good."""

    tag: str

    def handle(self, ctx: Context) -> str:
        RECORD.add(self.tag)
        return self.tag

    def max_attempts(self) -> int:
        return 1


FRAGILE_BROKEN = threading.Event()


class Fragile(Job):
    """Dispatches while FRAGILE_BROKEN is clear; after that its priority() raises."""

    def handle(self, ctx: Context) -> None:
        pass

    def priority(self) -> Priority:
        if FRAGILE_BROKEN.is_set():
            raise RuntimeError("fragile is broken")
        return Priority.NORMAL


class ProgressWrong(Job):
    """Reports progress with text where numbers go."""

    def handle(self, ctx: Context) -> None:
        ctx.progress("half", 10)  # type: ignore[arg-type]


class BlocksTheLoop(Job):
    """An async handler that blocks its loop with sync work (a mistake the worker must name)."""

    seconds: float

    async def handle(self, ctx: Context) -> str:
        time.sleep(self.seconds)
        return "unblocked"


class Chaotic(Job):
    """For the chaos test: logs each start to a file shared between processes, then behaves
    as its kind says: fast, slow, failing (for good), flaky (fails its first attempt) or
    timeout (runs past its timeout)."""

    kind: str
    log: str

    def handle(self, ctx: Context) -> str:
        with Path(self.log).open("a") as f:
            f.write(f"start {self.kind} {ctx.job_id} {ctx.attempt} {os.getpid()}\n")
        if self.kind == "failing":
            raise ValueError("failing for good")
        if self.kind == "flaky" and ctx.attempt == 1:
            raise ConnectionError("flaky first attempt")
        time.sleep({"fast": 0.01, "slow": 0.8, "timeout": 1.0}.get(self.kind, 0.0))
        return self.kind

    def should_retry(self, err: Exception) -> bool:
        return not isinstance(err, ValueError)

    def timeout(self) -> float | None:
        return 0.2 if self.kind == "timeout" else None

    def max_attempts(self) -> int:
        return 2 if self.kind == "timeout" else 6


STEPS = [threading.Event() for _ in range(3)]  # the test lets a Stepwise job take each step


class Stepwise(Job):
    """Reports step 1, 2, 3 of 3, each once the test has seen the one before."""

    def handle(self, ctx: Context) -> str:
        for i, step in enumerate(STEPS, start=1):
            ctx.progress(i, len(STEPS), f"step {i}")
            step.wait(30)
        return "stepped"


class FailsWhereTold(Job):
    """Fails in a process whose environment has NEONNB_TEST_FAIL set; succeeds elsewhere."""

    def handle(self, ctx: Context) -> str:
        if os.environ.get("NEONNB_TEST_FAIL"):
            raise RuntimeError("told to fail in this process")
        return "ran"

    def max_attempts(self) -> int:
        return 1


class FailsSaying(Job):
    """Fails for good with the error message it is given (control characters, say)."""

    message: str

    def handle(self, ctx: Context) -> None:
        raise ValueError(self.message)

    def should_retry(self, err: Exception) -> bool:
        return False
