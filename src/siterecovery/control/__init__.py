"""Configuration server: inventory database, REST API, durable jobs, events, portal."""
