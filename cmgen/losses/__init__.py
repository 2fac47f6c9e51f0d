"""cmgen.losses — the one contrastive loss module shared by every subsystem.

Imports nothing from the rest of the project except :mod:`cmgen.distributed`.
"""
