"""Process isolation for rewards: a bounded pool of killable worker processes (pool.py: math
and code both use it) and the code reward's confined zygote (zygote.py: a standalone,
stdlib-only script each code-reward worker runs)."""
