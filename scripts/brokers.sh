#!/usr/bin/env bash
# Make sure the machine's Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) answer; start what is down.
# RabbitMQ's management API (127.0.0.1:15672) must answer too: Flower reads queue depths from it.
set -euo pipefail

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

wait_for() {  # wait_for SECONDS WHAT CHECK...: until CHECK succeeds; exit 1 naming WHAT after SECONDS
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq 1 "$seconds"); do
    if "$@"; then
      return 0
    fi
    sleep 1
  done
  echo "brokers: $what still does not answer after $seconds s" >&2
  exit 1
}

brokers_answer() { answers 6379 && answers 5672 && redis-cli -p 6379 ping >/dev/null 2>&1; }

if ! answers 6379; then
  echo "brokers: Redis is down, starting it"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! answers 5672; then
  echo "brokers: RabbitMQ is down, starting it"
  rabbitmq-server -detached
fi
wait_for 90 "Redis or RabbitMQ" brokers_answer
echo "brokers: Redis and RabbitMQ answer"

if ! answers 15672; then
  echo "brokers: enabling RabbitMQ's management plugin (Flower's Broker tab reads it)"
  rabbitmq-plugins enable rabbitmq_management >/dev/null  # on the running node; a no-op if on
fi
wait_for 60 "RabbitMQ's management API (port 15672)" answers 15672
echo "brokers: RabbitMQ's management API answers"
