-- Accounts for local tests; run by deploy/local/up as root over the unix socket. Idempotent.
-- canal: what Canal's binlog dump needs. SELECT reads table metadata; REPLICATION SLAVE allows
-- the binlog dump; REPLICATION CLIENT (on MariaDB >= 10.5 an alias of BINLOG MONITOR) allows
-- SHOW MASTER STATUS / SHOW BINARY LOGS / SHOW BINLOG EVENTS.
CREATE USER IF NOT EXISTS 'canal'@'%' IDENTIFIED BY 'canal';
CREATE USER IF NOT EXISTS 'canal'@'localhost' IDENTIFIED BY 'canal';
ALTER USER 'canal'@'%' IDENTIFIED BY 'canal';
ALTER USER 'canal'@'localhost' IDENTIFIED BY 'canal';
GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'canal'@'%';
GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'canal'@'localhost';
-- test: the test suites create and drop their own databases (test_db, talent_platform, ...).
CREATE USER IF NOT EXISTS 'test'@'localhost' IDENTIFIED BY 'test';
CREATE USER IF NOT EXISTS 'test'@'127.0.0.1' IDENTIFIED BY 'test';
ALTER USER 'test'@'localhost' IDENTIFIED BY 'test';
ALTER USER 'test'@'127.0.0.1' IDENTIFIED BY 'test';
GRANT ALL PRIVILEGES ON *.* TO 'test'@'localhost';
GRANT ALL PRIVILEGES ON *.* TO 'test'@'127.0.0.1';
-- backfill: the grants README "Backfill" documents for canal.source_url when backfills run:
-- read the tables, create and write the watermark table (backfill.watermark_table, by default
-- canal_consumer.watermark) in a database of its own. The backfill tests run as this account.
CREATE DATABASE IF NOT EXISTS canal_consumer;
CREATE USER IF NOT EXISTS 'backfill'@'localhost' IDENTIFIED BY 'backfill';
CREATE USER IF NOT EXISTS 'backfill'@'127.0.0.1' IDENTIFIED BY 'backfill';
ALTER USER 'backfill'@'localhost' IDENTIFIED BY 'backfill';
ALTER USER 'backfill'@'127.0.0.1' IDENTIFIED BY 'backfill';
GRANT SELECT ON *.* TO 'backfill'@'localhost';
GRANT SELECT ON *.* TO 'backfill'@'127.0.0.1';
GRANT CREATE, INSERT, UPDATE ON canal_consumer.* TO 'backfill'@'localhost';
GRANT CREATE, INSERT, UPDATE ON canal_consumer.* TO 'backfill'@'127.0.0.1';
FLUSH PRIVILEGES;
