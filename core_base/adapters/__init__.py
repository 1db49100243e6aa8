"""Adapters for the ports: real (aio-pika, redis, asyncpg, boto3) and embedded (memory, SQLite, files)."""
