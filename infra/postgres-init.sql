-- The MLflow database is POSTGRES_DB; Prefect's lives beside it in the same server.
CREATE DATABASE prefect OWNER goalrank;
