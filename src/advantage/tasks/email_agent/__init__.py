"""ART-E, the email agent: answer questions about a generated inbox with search/read tools.

people.py (a company and its contacts) -> inbox.py (emails: topic threads with planted facts, noise) ->
questions.py (the QA set, train/test split by inbox) -> db.py (SQLite FTS5) -> tools.py (the agent's tools)
-> reward.py (+ judge.py) -> rollout.py -> train.py (the recipe) and bench.py (`advantage bench email`).
"""
