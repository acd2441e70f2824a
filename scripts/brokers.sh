#!/usr/bin/env bash
# Make sure the machine's Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) answer; start what is down.
set -euo pipefail

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

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
for _ in $(seq 1 90); do
  if answers 6379 && answers 5672 && redis-cli -p 6379 ping >/dev/null 2>&1; then
    echo "brokers: Redis and RabbitMQ answer"
    exit 0
  fi
  sleep 1
done
echo "brokers: Redis or RabbitMQ still does not answer after 90 s" >&2
exit 1
