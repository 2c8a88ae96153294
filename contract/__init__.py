"""What the API, the worker and the user agree on: the job spec, progress, settings, Redis names,
and the train-job store both sides read and write.

``service`` and ``worker`` both import this package and never each other; it imports only
``model`` (for presets), pydantic, redis and rq.
"""
