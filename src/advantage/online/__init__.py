"""Online RL: the served model's own traffic (`records.py`, kept by `store.py`), the feedback its callers give
(`feedback.py`), the judge that scores what no caller rated (`judging.py`), the GRPO groups formed from both
(`groups.py`), and the continual trainer that learns from them while the model serves (`trainer.py`)."""
