"""`overnight serve` on SIGTERM, as a process manager meets it: devices mid-upload finish,
their round commits, check-ins are turned away, health turns NOT_SERVING, the metrics page
answers throughout, and the process exits 0. Real TLS, real HTTP, real SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import socket
import sqlite3
import sys
import urllib.request

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from device_runtime.channel import ServerTrust, open_channel
from device_runtime.manifest import ModelManifest
from server.certificates import write_loopback_certificates
from tests.identities import ENROLLMENT_SECRET
from tests.server.test_drain import HalfUpload, _check_in

pytestmark = pytest.mark.e2e

REPO = pathlib.Path(__file__).resolve().parents[2]
TASK = (
    '[task]\ntask_id = "t1"\npopulation = "digits"\ntotal_rounds = 5\ntarget_reports = 2\n'
    "over_selection = 1.5\nmin_reports = 1\nselection_deadline_s = 600.0\n"
    "reporting_deadline_s = 1200.0\nepochs = 1\nbatch_size = 8\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as page:
        return page.read().decode()


def _gauge(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def test_sigterm_lets_uploads_finish_commits_their_round_and_exits_0(
    tmp_path: pathlib.Path, model_path: pathlib.Path
) -> None:
    task = tmp_path / "task.toml"
    task.write_text(TASK)
    data_dir = tmp_path / "state"
    tls = write_loopback_certificates(tmp_path / "tls")
    port, metrics_address = _free_port(), f"127.0.0.1:{_free_port()}"
    trust = ServerTrust(root_certificates=tls.root_certs.read_bytes())
    secret = tmp_path / "enrollment.secret"
    secret.write_bytes(ENROLLMENT_SECRET)

    async def scenario() -> tuple[int, str, str, int, int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "overnight",
            "serve",
            *("--address", f"127.0.0.1:{port}", "--admin-address", "127.0.0.1:0"),
            *("--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)),
            *("--data-dir", str(data_dir), "--task", str(task), "--model", str(model_path)),
            *("--metrics-address", metrics_address),
            *("--enrollment-secret-file", str(secret), "--exempt-network", "127.0.0.0/8"),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert process.stdout is not None
        try:
            line = b""
            while b"listening" not in line:
                line = await asyncio.wait_for(process.stdout.readline(), 60)
                assert line, "serve ended before it listened"
            async with open_channel(f"127.0.0.1:{port}", trust) as channel:
                tokens = [(await _check_in(channel, d)).assignment.upload_token for d in "abc"]
                n = _num_parameters(model_path)
                uploads = [HalfUpload(channel, t, n) for t in tokens[:2]]
                for upload in uploads:
                    await upload.start()
                page = await asyncio.to_thread(_scrape, metrics_address)
                while _gauge(page, "overnight_upload_slots_in_use") < 2:
                    page = await asyncio.to_thread(_scrape, metrics_address)
                os.kill(process.pid, signal.SIGTERM)
                health = health_pb2_grpc.HealthStub(channel)
                while (
                    await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                ).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                    await asyncio.sleep(0.01)
                late = await _check_in(channel, "late")
                page = await asyncio.to_thread(_scrape, metrics_address)  # while draining
                for upload in uploads:
                    await upload.finish()
            output = (await asyncio.wait_for(process.stdout.read(), 120)).decode()
            code = await process.wait()
            return (
                code,
                output,
                late.WhichOneof("outcome"),
                late.rejection.reason,
                _committed_rounds(data_dir),
                page,
            )
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    code, output, late, reason, committed, page = asyncio.run(scenario())
    check_ins = {
        (s.labels["outcome"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == "overnight_check_ins_total"
    }

    assert code == 0
    assert "coordinator stopped (drained)" in output
    assert (late, reason) == ("rejection", 5)  # SHUTTING_DOWN, with a retry window
    assert committed == 1
    assert check_ins == {("assigned", ""): 3, ("rejected", "shutting_down"): 1}


def _num_parameters(model_path: pathlib.Path) -> int:
    manifest = model_path.with_suffix(model_path.suffix + ".json")  # written by the exporter
    return ModelManifest.from_json(manifest.read_text()).num_parameters


def _committed_rounds(data_dir: pathlib.Path) -> int:
    path = data_dir / "coordinator.sqlite"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM rounds WHERE state = 'committed'").fetchone()
    return int(count)
