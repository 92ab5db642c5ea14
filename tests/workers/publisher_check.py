"""A minimal Celery app for tests/publisher_amqp.rs.

Run as `celery -A publisher_check worker -Q <queue> -c 1 --pool solo` from tests/workers.
It registers one task, `plugins.run`, that accepts any call and appends one JSON line per
execution to the file named by TASKS_OUT: task name, task id, root id, args, kwargs and the
AMQP priority it was delivered with. Nothing else: the test compares those lines with the
triggers it published.

Environment:
  CELERY_BROKER_URL        broker (default amqp://guest:guest@127.0.0.1:5672//)
  TASKS_OUT                file to append to (required)
  TASK_QUEUE_MAX_PRIORITY  Celery task_queue_max_priority; must equal the queue's
                           x-max-priority (the publisher's amqp.queue.max_priority), or the
                           worker dies with PRECONDITION_FAILED when it declares the queue
"""

import json
import os

from celery import Celery

app = Celery(
    "publisher_check",
    broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
)

_max_priority = os.environ.get("TASK_QUEUE_MAX_PRIORITY")
app.conf.update(
    task_queue_max_priority=int(_max_priority) if _max_priority else None,
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
)

_OUT = os.environ["TASKS_OUT"]


@app.task(bind=True, name="plugins.run")
def run(self, *args, **kwargs):
    req = self.request
    line = {
        "task": self.name,
        "id": req.id,
        "root_id": req.root_id,
        "args": list(args),
        "kwargs": kwargs,
        "priority": (req.delivery_info or {}).get("priority"),
    }
    with open(_OUT, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")
        out.flush()
