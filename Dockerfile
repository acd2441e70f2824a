# One image for every postroom process: pools, Flower, the demo. See docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY postroom ./postroom
COPY config ./config
COPY tasks ./tasks
COPY workers ./workers
RUN pip install --no-cache-dir . && useradd --create-home postroom
USER postroom
CMD ["postroom", "pools"]
