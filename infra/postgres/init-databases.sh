#!/bin/bash
# The Prefect and MLflow databases, each owned by its own login role. The postgres image runs this once, when its
# data volume is empty (/docker-entrypoint-initdb.d); the passwords come from the container's environment
# (PREFECT_DB_PASSWORD, MLFLOW_DB_PASSWORD in infra/.env). Idempotent: an existing role or database is kept.
# The entrypoint may source this file rather than execute it: no `exit`, no `set -u`, one prefixed function.
set -e

deeprubin_create_database() {  # <name: role and database> <password>
    if [ -z "$2" ]; then
        echo "init-databases.sh: no password for the '$1' role (set it in infra/.env)" >&2
        return 1
    fi
    # psql variables quote the values (:'v' a literal, :"v" an identifier); \gexec runs the generated statement.
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
         --set=name="$1" --set=password="$2" <<'EOSQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'name', :'password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'name')\gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'name', :'name')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name')\gexec
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
GRANT ALL PRIVILEGES ON DATABASE :"name" TO :"name";
EOSQL
}

deeprubin_create_database prefect "$PREFECT_DB_PASSWORD"
deeprubin_create_database mlflow "$MLFLOW_DB_PASSWORD"
