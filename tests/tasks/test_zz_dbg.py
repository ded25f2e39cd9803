import pytest
from tests.tasks.test_ratelimit_fleet import configure, start_fleet, generations, Fault, JobStatus, KNOWN_KEY, MODEL  # noqa
from tests.tasks.conftest import wait_for, worker_logs

@pytest.mark.timeout(600)
def test_dbg(configure, worker, fake, job_env):
    client = configure(models={"plain": {"type": "openai", "model": MODEL, "api_key": KNOWN_KEY,
                                         "base_url": fake.openai_base_url}})
    for every, fault in ((4, Fault("rate_limit")), (7, Fault("status", status=500)), (11, Fault("status", status=503))):
        fake.script.add(fault, every=every, times=None)
    workers = start_fleet(worker, 3, concurrency=50, visibility_timeout_s=8)
    jobs = client.submit_many([{"model": "plain", "prompt": f"mix-{i}", "stream": False} for i in range(500)])
    for victim in (0, 1):
        done = sum(client.store.count_by_status()[s] for s in ("succeeded", "failed"))
        wait_for(lambda: sum(client.store.count_by_status()[s] for s in ("succeeded", "failed")) >= done + 60, 120, "p")
        workers[victim].kill()
        workers.append(worker("openai", concurrency=50, visibility_timeout_s=8))
    import time
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        c = client.store.count_by_status()
        if c["succeeded"] + c["failed"] + c["dead"] >= 500: break
        time.sleep(1)
    print("COUNTS", client.store.count_by_status(), "mutex ttl", client.redis.ttl("unacked_mutex"))
    stuck = [client.get(j) for j in jobs if not client.get(j).final]
    for r in stuck[:3]:
        print("STUCK", r)
        for name, log in worker_logs(job_env).items():
            for line in log.splitlines():
                if r.job_id in line or "infrastructure" in line or "Traceback" in line or "ERROR" in line:
                    print("  ", name, line[:300])
    bad = [client.get(j) for j in jobs if client.get(j).status is not JobStatus.SUCCEEDED and client.get(j).final]
    for r in bad[:3]: print("BAD", r.status, r.error)
    assert False
