-- Runs once, when the `postgres` volume is empty (docker-entrypoint-initdb.d).
-- The platform database itself (POSTGRES_DB, `bklite`) is created by the image from the
-- environment; MLflow's tracking database is the only extra one.
CREATE DATABASE mlflow;
