"""Big arguments and results kept apart from the records (neonnb.artifacts): where they go by
default, the limit where they have nowhere to go, their files deleted with their jobs, and an
S3 location (moto's S3 server, started here) read by a worker in another process."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from neonnb import Config, JobFailed, QueueManager, SerializationError, Status, _loop
from neonnb.artifacts import ARTIFACT_BYTES
from tests import data_jobs
from tests.conftest import FakeClock
from tests.test_conformance import _run_elsewhere, assert_same

MakeManager = Callable[..., QueueManager]
BIG = "x" * (ARTIFACT_BYTES + 10)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_on_sqlite_big_values_live_beside_the_file_and_go_with_their_jobs(tmp_path: Path, clock: FakeClock) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    folder = tmp_path / "jobs.db-artifacts"
    with QueueManager(Config.for_url(url, max_retries=0, result_ttl=60), clock=clock) as qm:
        kept = qm.dispatch("q", data_jobs.Echo(BIG))  # a big argument, and so a big result
        doomed = qm.dispatch("q", data_jobs.Echo({"fail": BIG}))
        qm.dispatch("later", data_jobs.Echo(BIG))
        assert len(files_under(folder)) == 3 and len(kept.fetch().payload) < 200, "the records hold references"

        @qm.job(queue="q", max_attempts=1)
        def fails(value: Any) -> None:
            raise ValueError("no")

        failed = fails.dispatch(BIG)
        worker = qm.worker("q", 1)
        while worker.run_once():
            pass
        assert kept.result(timeout=10) == BIG and doomed.result(timeout=10) == {"fail": BIG}
        assert failed.status is Status.FAILED and qm.failed.arguments(failed.id) == {"value": BIG}
        assert len(files_under(folder)) == 6  # 4 payloads, 2 results
        assert qm.failed.forget(failed.id)
        assert len(files_under(folder)) == 5, "forgotten: its file at once"
        assert qm.purge("later") == 1
        clock.advance(3600 * 2)  # past the results' TTL, and past the sweep's grace
        _loop.run_sync(qm.core.housekeeping(clock()))
        assert qm.size("later") == 0 and qm.jobs(queue="later") == []
        assert files_under(folder) == [], "purged and expired jobs' files swept"


@pytest.mark.parametrize("make_manager", ["postgres", "redis"], indirect=True)
def test_without_a_place_for_them_values_over_the_limit_are_refused_saying_how(make_manager: MakeManager) -> None:
    qm = make_manager(max_value_bytes=ARTIFACT_BYTES + 1000, max_retries=0)
    assert qm.core.artifacts is None
    fits = qm.dispatch("q", data_jobs.Echo("y" * ARTIFACT_BYTES))  # kept in the store itself
    with pytest.raises(SerializationError, match=r"\(Config.max_value_bytes\): set artifacts="):
        qm.dispatch("q", data_jobs.Echo("z" * (ARTIFACT_BYTES + 2000)))

    @qm.job(queue="q", max_attempts=3)
    def grows(n: int) -> str:
        return "w" * n

    too_big = grows.dispatch(ARTIFACT_BYTES + 2000)
    worker = qm.worker("q", 1)
    while worker.run_once():
        pass
    assert len(fits.result(timeout=10)) == ARTIFACT_BYTES
    with pytest.raises(JobFailed, match=r"ResultError.*\(Config.max_value_bytes\)"):
        too_big.result(timeout=10)
    assert too_big.fetch().attempts == 1, "not retried: it would return the same"


def test_an_s3_location_serves_a_worker_in_another_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import fsspec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for name, value in {"FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)  # the worker in the other process reads them too
        fsspec.config.set_conf_env(fsspec.config.conf)
        s3 = fsspec.filesystem("s3", skip_instance_cache=True)
        s3.mkdir("neonnb-test")
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        with QueueManager(Config.for_url(url, artifacts="s3://neonnb-test/jobs")) as qm:
            part = data_jobs.frame_of(100_000)
            handle = qm.dispatch("values", data_jobs.Echo(part))
            assert len(s3.find("neonnb-test/jobs")) == 1, "the payload went to S3"
            _run_elsewhere(qm, "values", tmp_path)
            assert_same(handle.result(timeout=60), part, "a frame through S3")
            s3.invalidate_cache()
            assert len(s3.find("neonnb-test/jobs")) == 2, "and so did the result"
            assert not (tmp_path / "jobs.db-artifacts").exists()
    finally:
        fsspec.config.conf.pop("s3", None)
        server.stop()
        os.environ.pop("FSSPEC_S3_ENDPOINT_URL", None)
