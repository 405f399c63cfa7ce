"""Tasks that ship with advantage: the demo's multi-turn tool-use task (`tool_use`), used by `advantage demo`."""
