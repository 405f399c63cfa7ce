"""The records that cross the wire between a client and a backend, as pydantic models: trajectories and
groups (`records.py`), training sequences (`datum.py`), and each low-level operation's request and reply
(`ops.py`). The client, the server and the trainer all use these; this package imports nothing from
`advantage` but `advantage.config`, so every other layer may import it."""
