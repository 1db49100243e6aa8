"""Names and numbers shared by every process, each with the reason for its value."""

from __future__ import annotations

# --- RabbitMQ -------------------------------------------------------------
# One durable quorum queue per generation service; its dead letters go to
# "<queue>.dlq" through this exchange, so an operator can inspect and replay them.
DEAD_LETTER_EXCHANGE = "audiocraft.dlx"
DEAD_LETTER_SUFFIX = ".dlq"
# Every dead letter is also copied to "<queue>.dlq.watch", which the workers consume:
# a task the broker dead-lettered on its own (its delivery limit, after workers were
# lost mid-task each time) is failed there with the reason, while "<queue>.dlq"
# keeps its copy for the operator.
DEAD_LETTER_WATCH_SUFFIX = ".dlq.watch"
# Attempts a task gets (first try included) before it is failed and dead-lettered.
# Three covers a worker killed once or twice (OOM, preemption) without letting a
# poison task occupy a GPU for long.
MAX_TASK_ATTEMPTS = 3
# The queue's own x-delivery-limit: a safety net above MAX_TASK_ATTEMPTS for a
# task that crashes the worker every time before it can count attempts itself.
QUEUE_DELIVERY_LIMIT = MAX_TASK_ATTEMPTS + 2
# Backoff before a failed task goes back to the queue: base * 2**(attempt-1), capped.
RETRY_BACKOFF_BASE_S = 0.5
RETRY_BACKOFF_CAP_S = 30.0
# A worker waits for batch-mates at most this fraction of its last generation
# time (and never longer than WORKER_BATCH_WINDOW_MS): waiting then adds at most
# ~10% latency, whether a generation takes 10 ms (synth) or 10 s (a GPU model).
BATCH_WAIT_FRACTION = 0.1
# AMQP heartbeat. Generation runs off the event loop, so the loop answers
# heartbeats even during a multi-minute job; 30 s detects a dead peer quickly.
AMQP_HEARTBEAT_S = 30

# --- Redis ------------------------------------------------------------------
# Every key starts with a prefix so that several deployments (or tests) can
# share one Redis database without seeing each other's keys.
DEFAULT_KEY_PREFIX = "audiocraft:"
# Sub-service task records: status and the temporary result, namespaced by
# service because one workflow id is sent to several services. Progress lives
# in its own key so that a late progress write can never overwrite a result.
TASK_KEY = "task:{service}:{task_id}"
TASK_PROGRESS_KEY = "task:{service}:{task_id}:progress"
# The worker generating a task holds it here (its identity, with a TTL it renews)
# from its check until the result is recorded. A second copy of the task delivered
# to another worker meanwhile (RabbitMQ redelivers a task whose worker's connection
# dropped mid-generation, while that worker goes on) waits for the result instead
# of generating the task again in parallel. A worker that dies stops renewing: its
# claim runs out within TASK_CLAIM_TTL_S and a waiting copy runs.
TASK_CLAIM_KEY = "task:{service}:{task_id}:worker"
TASK_CLAIM_TTL_S = 15.0
TASK_CLAIM_RENEW_S = 5.0
# How often a copy waiting for another worker's result looks again.
TASK_CLAIM_CHECK_S = 2.0
# A model that has shown no progress for this long (a hung GPU call) keeps no claim:
# its claims run out, and the copies waiting elsewhere run. Every backend reports
# each decoding step; the long silence is the audio decoding after the last one.
TASK_CLAIM_STALL_S = 120.0
# How long a sub-service keeps a finished task's result. The App API stores the
# final result in Postgres long before this runs out; a day covers a long outage
# of the App API's callback route.
DEFAULT_RESULT_TTL_S = 24 * 3600
# Progress is written at most this often per task: enough for a progress bar,
# cheap for Redis under a full batch.
PROGRESS_MIN_INTERVAL_S = 0.5
# A batch's running callbacks go out once it has been generating this long. A task
# done sooner goes from queued straight to its result: the App API is spared a
# request and a database write per short task, and a client could hardly have seen
# the running state anyway. (The task store's running mark is written at once.)
RUNNING_REPORT_DELAY_S = 0.25

# --- S3 ------------------------------------------------------------------------
# One object per (task, kind): re-running a redelivered task overwrites the same
# key instead of creating a second object.
AUDIO_OBJECT_KEY = "audio/{task_id}/{kind}.{format}"
# Presigned URLs expire after an hour by default: long enough to download, short
# enough that a leaked link goes stale.
DEFAULT_PRESIGN_EXPIRES_S = 3600

# --- HTTP ---------------------------------------------------------------------
# Bodies larger than this are refused before they are parsed (413).
MAX_BODY_BYTES = 1024 * 1024
# The sub-service APIs take batches of tasks (``MAX_BATCH_TASKS``, prompts of up to
# 2,000 characters, each at worst 6 bytes of JSON): a larger limit of their own.
MAX_INTERNAL_BODY_BYTES = 2 * 1024 * 1024
# Outbound HTTP calls (callbacks, fan-out) time out quickly; retries cover blips.
HTTP_TIMEOUT_S = 10.0
