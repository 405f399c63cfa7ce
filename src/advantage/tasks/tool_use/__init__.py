"""A multi-turn tool-use task (weather, currency, units, calendar): env.py, reward.py, rollout.py."""
