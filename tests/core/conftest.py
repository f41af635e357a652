from core_helpers import problem  # noqa: F401  (fixture)
