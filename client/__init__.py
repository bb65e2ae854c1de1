# Before anything else: see common/preload.py for the two-thread import race this prevents.
import common.preload  # noqa: F401
