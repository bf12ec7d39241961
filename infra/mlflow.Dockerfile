# MLflow tracking server with the Postgres backend driver and the S3 client (artifacts in MinIO).
# The version is the client's (constraints.txt): a server older than its clients may lack their API.
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1

RUN pip install psycopg2-binary boto3

EXPOSE 5000
