"""A real Celery plugin worker for canal-consumer's end-to-end tests.

It stands in for the Python plugin workers that consume the task messages canal-consumer
publishes in Celery mode. Every task it runs is appended as one JSON line to the file named by
the environment variable TASKS_OUT, so a test can read back exactly what a worker received:

    {"task_id": ..., "task": "canal_consumer.plugin", "args": [...], "kwargs": {...},
     "priority": <AMQP priority as delivered or null>, "redelivered": <bool or null>,
     "routing_key": ...}

Run it from this directory with the venv that deploy/local/up creates:

    cd tests/workers
    TASKS_OUT=/tmp/tasks.jsonl /var/tmp/canal-consumer/venv/bin/celery -A tasks worker \
        -Q plugin_tasks --concurrency 1 --loglevel INFO

Settings:
  CELERY_BROKER_URL  broker (default amqp://guest:guest@127.0.0.1:5672//, the local RabbitMQ)
  TASKS_OUT          output file; lines are written with one write() each and fsync'ed, so a
                     test that sees a line knows the worker ran the task. Unset: nothing is written.

  CC_QUEUE, CC_QUEUE_ARGUMENTS
                     when both are set, the worker declares queue CC_QUEUE with exactly these
                     arguments (a JSON object, e.g. a quorum queue's {"x-queue-type": "quorum",
                     "x-dead-letter-exchange": ..., ...}) and no x-max-priority: what a worker
                     must declare to share a quorum queue with canal-consumer (README "RabbitMQ
                     cluster").

task_queue_max_priority = 10 makes the worker declare its queues with x-max-priority=10; a
publisher that declares plugin_tasks itself must use the same arguments, or one of the two gets
406 PRECONDITION_FAILED.
"""

import json
import os

from celery import Celery

app = Celery(
    "canal_consumer_workers",
    broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
)
if os.environ.get("CC_QUEUE") and os.environ.get("CC_QUEUE_ARGUMENTS"):
    from kombu import Queue

    _name = os.environ["CC_QUEUE"]
    app.conf.task_queues = [
        Queue(_name, routing_key=_name, queue_arguments=json.loads(os.environ["CC_QUEUE_ARGUMENTS"]))
    ]
else:
    app.conf.task_queue_max_priority = 10


def _append_line(path, record):
    """Append one JSON line durably: a single O_APPEND write, then fsync."""
    data = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@app.task(name="canal_consumer.plugin", bind=True, ignore_result=True)
def plugin(self, *args, **kwargs):
    """Record the call; canal-consumer's Celery mode publishes tasks under this name."""
    delivery = self.request.delivery_info or {}
    record = {
        "task_id": self.request.id,
        "task": self.name,
        "args": list(args),
        "kwargs": kwargs,
        "priority": delivery.get("priority"),
        "redelivered": delivery.get("redelivered"),
        "routing_key": delivery.get("routing_key"),
    }
    out = os.environ.get("TASKS_OUT")
    if out:
        _append_line(out, record)
    return None
