"""Online RL: the served model's own traffic (`store.py`), the feedback its callers give (`feedback.py`), and
the GRPO groups formed from both (`groups.py`)."""
