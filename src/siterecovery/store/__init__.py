"""The configuration server's store: models, states, the database and its migrations, sessions,
the item index, durable jobs, events, tokens, certificates and the process-wide context.

Below both the API (`control`) and the DR workflows (`dr`): it imports neither.
"""
