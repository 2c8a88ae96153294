"""The HTTP service: thin routes over one generation engine, plus the train-jobs API."""
