"""The background-job rules without Ray: one at a time, the power profile, the CPU share, the
daily budget (kept across restarts in the real metrics database), cancelling, shutdown. The
jobs' model work on a real daemon is in test_speculation.py."""

from __future__ import annotations

import asyncio

from mirador.runtime.config_schema import JobsConfig
from mirador.runtime.jobs import JobManager
from mirador.runtime.metrics import MetricsStore


def manager(tmp_path, profile="maximum", **config):
    metrics = MetricsStore(tmp_path / "metrics.sqlite3")
    state = {"profile": profile}
    jobs = JobManager(JobsConfig(**config), lambda: state["profile"], metrics)
    return jobs, state, metrics


def submit(jobs, seconds, steps=1, log=None):
    """A job of ``steps`` steps of ``seconds`` each (standing in for model calls)."""
    async def work(job):
        for _ in range(steps):
            await jobs.step(job, lambda: asyncio.sleep(seconds), lambda: None)
            if log is not None:
                log.append(job.id)

    return jobs.submit("prefill", "quick", work)


def test_jobs_run_one_at_a_time_and_are_listed_with_their_cost(tmp_path):
    async def scenario():
        jobs, _, metrics = manager(tmp_path)
        await jobs.start()
        order = []
        first, second = submit(jobs, seconds=0.05, steps=2, log=order), submit(jobs, seconds=0.05, log=order)
        await asyncio.sleep(0.01)
        assert (first.state, second.state) == ("running", "queued")
        await asyncio.gather(*list(jobs._tasks.values()))
        assert order == [first.id, first.id, second.id]
        listed = jobs.list()
        assert [j["id"] for j in listed["jobs"]] == [second.id, first.id]
        assert all(j["state"] == "done" and j["cost"]["model_s"] >= 0.05 for j in listed["jobs"])
        assert listed["allowed"] is None and listed["budget"]["spent_today_s"] >= 0.15
        metrics.close()

    asyncio.run(scenario())


def test_no_jobs_on_the_minimal_profile_nor_on_balanced_unless_allowed_nor_when_off(tmp_path):
    async def scenario():
        jobs, state, metrics = manager(tmp_path, profile="minimal")
        job = submit(jobs, seconds=0.01)
        await asyncio.gather(*list(jobs._tasks.values()))
        assert job.state == "skipped" and "minimal" in job.stop_reason
        state["profile"] = "balanced"
        assert "on_balanced" in jobs.why_not()
        jobs.config = JobsConfig(on_balanced=True)
        assert jobs.why_not() is None
        jobs.config = JobsConfig(enabled=False)
        assert "enabled = false" in jobs.why_not()
        metrics.close()

    asyncio.run(scenario())


def test_a_profile_turning_minimal_stops_a_running_job_at_its_next_step(tmp_path):
    async def scenario():
        jobs, state, metrics = manager(tmp_path)
        job = submit(jobs, seconds=0.05, steps=10)
        await asyncio.sleep(0.08)
        state["profile"] = "minimal"
        await asyncio.gather(*list(jobs._tasks.values()))
        assert job.state == "cancelled" and "minimal" in job.stop_reason and job.model_s < 0.3
        metrics.close()

    asyncio.run(scenario())


def test_the_daily_budget_stops_jobs_and_is_kept_across_restarts(tmp_path):
    async def scenario():
        jobs, _, metrics = manager(tmp_path, daily_cpu_s=0.1)
        await jobs.start()
        spender = submit(jobs, seconds=0.06, steps=5)
        await asyncio.gather(*list(jobs._tasks.values()))
        assert spender.state == "cancelled" and "budget" in spender.stop_reason
        assert 0.1 <= spender.model_s < 0.2  # it stopped at the first step past the budget
        late = submit(jobs, seconds=0.01)
        await asyncio.gather(*list(jobs._tasks.values()))
        assert late.state == "skipped" and "daily_cpu_s" in late.stop_reason
        metrics.close()

        again, _, metrics = manager(tmp_path, daily_cpu_s=0.1)  # a restarted daemon
        await again.start()
        assert again.spent_today() >= 0.1 and "budget" in again.why_not()
        assert {j["id"] for j in again.list()["jobs"]} == {spender.id, late.id}  # recent jobs survive too
        metrics.close()

    asyncio.run(scenario())


def test_the_cpu_share_makes_jobs_rest(tmp_path):
    async def scenario():
        jobs, _, metrics = manager(tmp_path, cpu_share=0.01)  # 0.6 s of every minute
        job = submit(jobs, seconds=0.7, steps=2)
        await asyncio.sleep(1.0)
        assert job.state == "waiting" and "cpu_share" in job.progress  # its second step waits
        assert jobs.list()["budget"]["share_used"] > 0.01
        jobs.cancel(job.id)
        await asyncio.gather(*list(jobs._tasks.values()))
        assert job.state == "cancelled" and job.stop_reason == "cancelled by the user"
        metrics.close()

    asyncio.run(scenario())


def test_cancel_and_shutdown_stop_running_and_queued_jobs(tmp_path):
    async def scenario():
        jobs, _, metrics = manager(tmp_path)
        stopped = []

        async def work(job):
            await jobs.step(job, lambda: asyncio.sleep(5), lambda: stopped.append(job.id))

        running = jobs.submit("followups", "quick", work)
        queued = jobs.submit("followups", "quick", work)
        await asyncio.sleep(0.05)
        assert jobs.cancel(queued.id) and not jobs.cancel("j-none")
        await jobs.close(timeout=1)
        assert stopped == [running.id]  # the running model call was told to stop
        assert running.state == queued.state == "cancelled"
        assert running.stop_reason == "the daemon is shutting down" and queued.stop_reason == "cancelled by the user"
        assert "shutting down" in jobs.why_not()
        metrics.close()

    asyncio.run(scenario())
