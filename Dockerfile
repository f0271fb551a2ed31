# twin-service image: the service with the MongoDB and Elasticsearch extras.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY twin_service ./twin_service
COPY connectivity ./connectivity
COPY search ./search
RUN pip install --no-cache-dir '.[mongodb,elasticsearch]' \
    && useradd --system --uid 10001 twin \
    && mkdir /data && chown twin /data
USER 10001
# Both servers listen on every interface: a container's loopback is its own.
ENV TWIN_DATA_DIR=/data TWIN_HOST=0.0.0.0 TWIN_MQTT__EMBEDDED_HOST=0.0.0.0
EXPOSE 8080 1883
ENTRYPOINT ["twin-service"]
CMD ["serve"]
