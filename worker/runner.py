"""The worker's parent process: an RQ worker on Settings.queue_name that forks a horse per job.

Nothing here touches CUDA: the job function (``worker.jobs``) is imported by the work horse
after the fork, so CUDA starts in each horse and dies with it (a CUDA context does not survive a
fork), and the parent survives whatever a job does, an out-of-memory error included.

Abandoned jobs. While a horse runs, the parent renews the job's entry in RQ's
StartedJobRegistry every ``JOB_HEARTBEAT_S`` seconds (RQ's ``job_monitoring_interval``), each time
for ``JOB_ABANDONED_AFTER_S`` seconds (``TrainWorker.get_heartbeat_ttl``; RQ itself would add a
fixed 60 s). If the worker is killed, the renewals stop and the entry expires at most
``JOB_ABANDONED_AFTER_S`` seconds (30 by default) after the kill. Whoever next runs RQ's
``StartedJobRegistry.cleanup`` then moves the job to the FailedJobRegistry with an
AbandonedJobError: the API does on every GET of /train-jobs, and every worker does when it starts
and between jobs (``maintenance_interval``). The API reports such a job as ``abandoned``; its
horse, orphaned, has already saved a checkpoint and exited (``worker.jobs.StopRequests``), and
resuming the job continues from that checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from rq import Worker
from rq.job import Job

from contract.broker import connect
from contract.settings import Settings
from contract.store import train_queue

log = logging.getLogger("slm.worker")

PUBSUB_WAKE_S = 1.0  # the longest a stopping worker waits for its command-channel thread

_stop_signalled = False


def stop_signalled() -> bool:
    """Whether this work horse got SIGTERM, its worker's request to stop at a checkpoint."""
    return _stop_signalled


def _on_stop_signal(signum: int, frame: object) -> None:
    global _stop_signalled
    _stop_signalled = True


class TrainWorker(Worker):
    """RQ's forking worker, with the time after which a silent job counts as abandoned taken
    from Settings rather than RQ's ``job_monitoring_interval + 60``, and a warm shutdown that
    stops the running job at a checkpoint instead of waiting for it to finish."""

    abandoned_after_s: int = 30
    job_timeout_s: int = 7 * 24 * 3600

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.abandoned_after_s

    def handle_warm_shutdown_request(self) -> None:
        """SIGTERM or a first Ctrl-C: RQ would wait for the whole run, days perhaps, and
        `docker stop` would then kill it anyway. Ask the job to stop instead: within a step it
        saves a checkpoint and ends ``stopped``, ready to resume; then this worker exits. The
        request goes to the horse as a signal, not through Redis: when `slm up` dies, its
        embedded Redis is told to stop at the same moment as this worker."""
        super().handle_warm_shutdown_request()
        if self.execution is not None and self.horse_pid:
            with contextlib.suppress(ProcessLookupError):  # the horse has just ended
                os.kill(self.horse_pid, signal.SIGTERM)

    def subscribe(self) -> None:
        """RQ's command channel, read by a thread that wakes every PUBSUB_WAKE_S rather than
        RQ's 60 s: since redis-py 8.2, stopping that thread (RQ's ``unsubscribe``, on every
        shutdown) waits for its wait on the channel to end, so a worker told to stop while idle
        took up to a minute to exit."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_WAKE_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def setup_work_horse_signals(self) -> None:
        """In the horse: SIGTERM sets ``stop_signalled`` instead of killing it (RQ itself ends a
        horse with SIGKILL, never SIGTERM)."""
        super().setup_work_horse_signals()
        signal.signal(signal.SIGTERM, _on_stop_signal)


def run_worker(settings: Settings, *, queue_name: str | None = None, burst: bool = False) -> bool:
    """Work on the queue until stopped (or, with ``burst``, until it is empty). Needs
    ``settings.redis_url``; ``slm worker`` starts an embedded Redis when it is unset."""
    connection = connect(settings)
    queue = train_queue(connection, queue_name or settings.queue_name)
    worker = TrainWorker(
        [queue],
        connection=connection,
        serializer=queue.serializer,  # the worker reads jobs back as the queue wrote them
        job_monitoring_interval=settings.job_heartbeat_s,
        maintenance_interval=settings.job_abandoned_after_s,
    )
    worker.abandoned_after_s = settings.job_abandoned_after_s
    worker.job_timeout_s = settings.job_timeout_s
    log.info(
        "worker %s on queue %r: heartbeat every %d s, a silent job is abandoned after %d s",
        worker.name,
        queue.name,
        settings.job_heartbeat_s,
        settings.job_abandoned_after_s,
    )
    return worker.work(burst=burst, with_scheduler=False)
