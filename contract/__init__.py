"""What the API, the worker and the user agree on: the job spec, progress, settings, Redis names.

``service`` and ``worker`` both import this package and never each other; it imports only
``model`` (for presets) and pydantic.
"""
