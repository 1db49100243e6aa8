#!/usr/bin/env bash
# Makes sure PostgreSQL, Redis and RabbitMQ answer on their default local ports,
# starting the ones that are down (commands for this project's dev/CI machines).
# Fails with a clear message when one cannot be started.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() {  # port name
  for _ in $(seq 1 120); do
    if up "$1"; then return 0; fi
    sleep 0.5
  done
  echo "services.sh: $2 is not answering on 127.0.0.1:$1" >&2
  return 1
}

if ! up 5432; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi
if ! up 6379; then
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi
if ! up 5672; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached || true
fi
wait_up 5432 PostgreSQL && wait_up 6379 Redis && wait_up 5672 RabbitMQ
# The test database must exist (CI machines have it; a developer's may not).
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null
